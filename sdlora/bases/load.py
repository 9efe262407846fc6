"""Base-model sources: the built-in model, diffusers folders, hub ids, single files.

A base is named by a string:
- ``tiny``: the built-in base that ships with sdlora (``sdlora/base_model``);
- ``tiny-random``: the same SD architecture, small, with random weights from a
  fixed seed (tests and benchmarks; it draws noise);
- ``tiny-random-xl``: a small SDXL architecture (both text encoders, the size embedding), random weights (tests);
- ``sd15-random`` / ``sdxl-random``: the full SD 1.5 / SDXL architecture with random weights (benchmarks);
- a local diffusers folder (has ``model_index.json``);
- a single-file checkpoint in original-SD layout (``.safetensors``);
- anything else is taken as a hub id for ``from_pretrained``.

``load_base`` caches one copy per (name, dtype, device) per process; all weights
are frozen. Training asks for a fresh copy so it never disturbs a generator.
"""
from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.bases import families
from sdlora.bases import precision as precision_mod

PACKAGE_DIR = Path(__file__).resolve().parent.parent
BUILTIN_DIR = PACKAGE_DIR / "base_model"
TOKENIZER_DIR = PACKAGE_DIR / "assets" / "clip_tokenizer"
CONFIGS_DIR = PACKAGE_DIR / "configs"

# SD 1.x training noise schedule (CompVis v1-inference.yaml: linear_start/end, 1000 steps).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", prediction_type="epsilon",
                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)


class BaseModelError(ValueError):
    """A base model could not be found or loaded."""


@dataclass
class Base:
    """The frozen components of a Stable Diffusion 1.x/2.x or SDXL pipeline."""
    name: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: object                  # the sampling scheduler generation uses
    family: str = "sd1"                # a name of the family table (sdlora.bases.families): sd1 | sd2 | sdxl
    resolution: int = 512              # native image size in px
    lora_lr: float | None = None       # the LoRA learning rate the base recommends (its build.json), if any
    lora_steps_per_image: int | None = None   # the training steps per image it recommends (its build.json), if any
    sampling: tuple[int, float] | None = None   # (steps, guidance) the base recommends (its build.json), if any
    lora_stack: object = field(default=None, repr=False)  # generation's LoRAs on this base, one for all its Generators
    text_encoder_2: object = None      # SDXL: OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    tokenizer_2: object = None         # SDXL: its tokenizer (pads with "!")

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        """{"text_encoder": CLIP, and for SDXL "text_encoder_2": bigG}: the component names LoRA keys use."""
        out = {"text_encoder": self.text_encoder}
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.text_encoder_2
        return out

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, *self.text_encoders.values()]

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.get("prediction_type", "epsilon")

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def geometry(self) -> "Geometry":
        return geometry(dict(self.unet.config), dict(self.vae.config))

    def noise_scheduler(self) -> DDPMScheduler:
        """The DDPM scheduler training adds noise with, from the base's own config."""
        return DDPMScheduler.from_config(self.scheduler.config)

    def module_names(self) -> dict[str, set[str]]:
        """Dotted paths of every Linear/Conv2d module, per component (LoRA file matching)."""
        def names(model: torch.nn.Module) -> set[str]:
            return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        return {"unet": names(self.unet), **{c: names(m) for c, m in self.text_encoders.items()}}


_cache: dict[tuple, Base] = {}
_cache_lock = threading.Lock()


def load_base(name: str = "tiny", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              fresh: bool = False, precision: str | None = None, quantize_text_encoder: bool = True) -> Base:
    """Load (once per process, unless ``fresh``) and freeze a base model.

    ``dtype`` is the compute dtype. ``precision`` (sdlora.bases.precision) keeps the weights in fp32 / bf16 /
    fp16 instead, or quantises the U-Net's linear layers (and the text encoder's, if
    ``quantize_text_encoder``) to int8 / nf4 with the rest of all three models in 16 bits.
    """
    precision = precision or {v: k for k, v in precision_mod.DTYPES.items()}.get(dtype, "fp32")
    storage = precision_mod.storage_dtype(precision, dtype, device)
    if precision in precision_mod.QUANTIZED:
        precision_mod.bitsandbytes()          # a missing package is said before a multi-GB load
    key = (name, storage, str(device), precision, quantize_text_encoder)
    with _cache_lock:
        if not fresh and key in _cache:
            return _cache[key]
        base = _load(name)
        for model in base.models:
            model.requires_grad_(False)
            model.eval()
            if model.dtype != storage:
                model.to(dtype=storage)
            text = model is not base.unet and model is not base.vae
            if model is base.unet or (text and quantize_text_encoder):
                precision_mod.quantize(model, precision, compute=storage, device=device)
            model.to(device)
        if not fresh:
            _cache[key] = base
        return base


def _load(name: str) -> Base:
    if name == "tiny":
        if not (BUILTIN_DIR / "model_index.json").is_file():
            raise BaseModelError(f"the built-in base model is missing from {BUILTIN_DIR}; "
                                 "rebuild it with 'python -m sdlora.tinybase build'")
        return _from_folder(BUILTIN_DIR, "tiny")
    if name == "tiny-random":
        return tiny_random_base()
    if name == "tiny-random-xl":
        return tiny_random_xl_base()
    if name in RANDOM_BASES:
        return random_base_from_configs(CONFIGS_DIR / families.variant(RANDOM_BASES[name]).config_folder, name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise BaseModelError(f"{path} is a folder but not a diffusers pipeline (no model_index.json); "
                                 "pass a diffusers folder or a .safetensors checkpoint file")
        return _from_folder(path, name)
    if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin") or path.is_file():
        if not path.is_file():
            raise BaseModelError(f"base checkpoint {path} does not exist; check the path")
        return _from_single_file(path)
    return _from_hub(name)


def load_vae(name: str, like: AutoencoderKL) -> AutoencoderKL:
    """A VAE to use instead of a base's (`like`): a diffusers folder (config.json + weights), a .safetensors file
    in the diffusers or the original (`first_stage_model.` / `encoder.down...`) layout with `like`'s config, or
    a hub id. The result is frozen and in eval mode; its config (force_upcast) says whether fp16 is safe for it."""
    from sdlora.bases.ldm_keys import vae_from_ldm
    path = Path(name).expanduser()
    try:
        if path.is_dir():
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
        elif path.suffix.lower() == ".safetensors":
            if not path.is_file():
                raise BaseModelError(f"VAE file {path} does not exist; check the path")
            from safetensors.torch import load_file
            sd = load_file(str(path))
            ldm = ("first_stage_model.", "encoder.down.", "encoder.mid.", "decoder.up.", "decoder.mid.")
            if any(k.startswith(ldm) for k in sd):           # the original layout (A1111's VAE files)
                sd = vae_from_ldm(sd, dict(like.config))
            vae = AutoencoderKL.from_config(like.config)
            vae.load_state_dict(sd, strict=True)
        else:
            vae = AutoencoderKL.from_pretrained(name)
    except BaseModelError:
        raise
    except Exception as e:  # diffusers and safetensors raise many kinds for a folder or file that is not a VAE
        raise BaseModelError(f"could not load the VAE '{name}' ({type(e).__name__}: {str(e)[:200]}); pass a diffusers "
                             "VAE folder, a .safetensors VAE or a hub id (with network)") from e
    if tuple(vae.config.block_out_channels) != tuple(like.config.block_out_channels) or \
            vae.config.latent_channels != like.config.latent_channels:
        raise BaseModelError(f"the VAE '{name}' is not the shape of the base's (channels {list(vae.config.block_out_channels)}"
                             f" vs {list(like.config.block_out_channels)}): use a VAE made for this base's family")
    return vae.requires_grad_(False).eval()


def _from_folder(path: Path, name: str) -> Base:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    try:
        kind = json.loads((path / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
        if kind == "StableDiffusionXLPipeline":
            pipe = StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)
        elif kind.startswith("StableDiffusionXL"):
            raise BaseModelError(f"{path} is a {kind} (an SDXL refiner, inpainting or image-to-image pipeline); "
                                 "use an SDXL text-to-image base")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                path, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, BaseModelError):
            raise
        raise BaseModelError(f"could not load the diffusers pipeline in {path}: {e}") from e
    base = _from_pipeline(pipe, name)
    base.lora_lr = recommended_lora_lr(path)
    base.lora_steps_per_image = recommended_steps_per_image(path)
    base.sampling = recommended_sampling(path)
    return base


def base_lora_lr(name: str) -> float | None:
    """The LoRA learning rate base `name` recommends, read without loading it (None: use the default)."""
    return recommended_lora_lr(_config_folder(name))


def base_steps_per_image(name: str) -> int | None:
    """The training steps per image base `name` recommends, read without loading it (None: use the default)."""
    return recommended_steps_per_image(_config_folder(name))


def _build_config(folder: Path) -> dict:
    """The "config" of a base folder's sdlora build.json (the built-in base has one), else {}."""
    try:
        config = json.loads((Path(folder) / "build.json").read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return config if isinstance(config, dict) else {}


def recommended_lora_lr(folder: Path) -> float | None:
    """The "lora_lr" of a base folder's sdlora build.json, else None."""
    value = _build_config(folder).get("lora_lr")
    return float(value) if isinstance(value, (int, float)) and 0 < value < 1 else None


def recommended_steps_per_image(folder: Path) -> int | None:
    """The "lora_steps_per_image" of a base folder's sdlora build.json (a whole number, 1 to 10,000), else None."""
    value = _build_config(folder).get("lora_steps_per_image")
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 10_000 else None


def recommended_sampling(folder: Path) -> tuple[int, float] | None:
    """(steps, guidance) of a base folder's sdlora build.json ("sample_steps", "guidance"), else None."""
    config = _build_config(folder)
    steps, guidance = config.get("sample_steps"), config.get("guidance")
    if isinstance(steps, int) and 0 < steps <= 500 and isinstance(guidance, (int, float)) and 0 <= guidance <= 50:
        return steps, float(guidance)
    return None


def _from_pipeline(pipe, name: str) -> Base:
    te2 = getattr(pipe, "text_encoder_2", None)
    family = "sdxl" if te2 is not None else _family_of(pipe.text_encoder.config.hidden_size, name)
    res = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return Base(name=name, unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, family=family, resolution=res,
                text_encoder_2=te2, tokenizer_2=getattr(pipe, "tokenizer_2", None))


def _family_of(text_width: int, name: str) -> str:
    """The family of a one-text-encoder base by its width (768 SD 1.x, 1024 SD 2.x). Small bases of other widths
    (the built-in `tiny`, test bases) are SD 1.x-architecture: CLIP ViT-L's tokenizer, epsilon prediction."""
    family = families.by_text_width(text_width)
    return "sd1" if family == families.UNKNOWN else family


def _from_hub(name: str) -> Base:
    from diffusers import DiffusionPipeline
    try:
        pipe = DiffusionPipeline.from_pretrained(name)          # the pipeline class its model_index.json names
    except Exception as e:  # hub errors come in many classes (OSError, HTTP, offline mode)
        raise BaseModelError(
            f"could not get base model '{name}' from the model hub ({type(e).__name__}). "
            "Without network access, pass a local diffusers folder or a .safetensors checkpoint file, "
            "or use the built-in base 'tiny'") from e
    if type(pipe).__name__ not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise BaseModelError(f"'{name}' is a {type(pipe).__name__}, not an SD 1.x/2.x or SDXL text-to-image base")
    return _from_pipeline(pipe, name)


def _from_single_file(path: Path) -> Base:
    from sdlora.bases import single_file as ldm
    parts = ldm.load_single_file(path)
    unet, vae = parts["unet"], parts["vae"]
    res = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return Base(name=str(path), unet=unet, vae=vae, text_encoder=parts["text_encoder"],
                tokenizer=parts["tokenizer"], scheduler=parts["scheduler"],
                family=parts["family"], resolution=res, text_encoder_2=parts.get("text_encoder_2"),
                tokenizer_2=parts.get("tokenizer_2"))


def _config_folder(name: str) -> Path:
    """The folder holding base `name`'s configs (the built-in ones, or the path given); it may not exist."""
    if name in RANDOM_BASES:
        return CONFIGS_DIR / families.variant(RANDOM_BASES[name]).config_folder
    return {"tiny": BUILTIN_DIR}.get(name, Path(name).expanduser())


@dataclass(frozen=True)
class Geometry:
    """The image sizes a base works at."""
    resolution: int      # native size in px (square)
    multiple: int        # what every side must be a multiple of: the VAE's and the U-Net's downsampling


def geometry(unet_config: dict, vae_config: dict) -> Geometry:
    """A base's Geometry from its U-Net and VAE configs (diffusers: sample_size, block_out_channels)."""
    vae = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet = 2 ** (len(unet_config["block_out_channels"]) - 1)
    return Geometry(int(unet_config["sample_size"]) * vae, vae * unet)


SD_GEOMETRY = Geometry(512, 64)        # hub ids and unreadable files are taken as SD's


def native_geometry(name: str) -> Geometry:
    """A base's Geometry, read from its configs without loading any weights.

    Lets the dataset be checked (and bucketed) before the (slow, large) base is loaded. A single file's
    is its variant's (read from its header) or its own configs'; hub ids are taken as SD's.
    """
    if name == "tiny-random":
        return Geometry(64, 16)                  # tiny_random_base: 8 latent px, 8x VAE, two U-Net levels
    if name == "tiny-random-xl":
        return Geometry(64, 32)                  # tiny_random_xl_base: 8 latent px, 8x VAE, three U-Net levels
    path = Path(name).expanduser()
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from sdlora.bases import single_file
        try:
            with warnings.catch_warnings():      # the load itself says what it assumed
                warnings.simplefilter("ignore")
                return geometry(*single_file.native_configs(path))
        except (ValueError, OSError):
            return SD_GEOMETRY                   # the load names the problem
    folder = _config_folder(name)
    try:
        return geometry(json.loads((folder / "unet" / "config.json").read_text()),
                        json.loads((folder / "vae" / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return SD_GEOMETRY


def native_resolution(name: str) -> int:
    """A base's native image size in px (see native_geometry)."""
    return native_geometry(name).resolution


def load_tokenizer(folder: Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """The real CLIP BPE tokenizer SD 1.x uses (49,408 tokens), shipped as data."""
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def tiny_random_base(seed: int = 0, sample_size: int = 8) -> Base:
    """A very small SD-architecture pipeline with random weights (tests).

    Same classes as SD 1.5 with the VAE's 8x downsampling (4 blocks); the U-Net has
    two cross-attention down blocks, the mid block and two up blocks of two: 7 transformer blocks.
    """
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    scheduler = DPMSolverMultistepScheduler(**{k: v for k, v in SD_SCHEDULE.items()
                                               if k not in ("clip_sample", "set_alpha_to_one")})
    return Base(name="tiny-random", unet=unet, vae=vae, text_encoder=text_encoder,
                tokenizer=load_tokenizer(), scheduler=scheduler, family="sd1", resolution=sample_size * 8)


def random_base_from_configs(folder: Path, name: str, seed: int = 0) -> Base:
    """A full-size architecture with random weights, built from bundled diffusers configs (SD 1.5, SDXL)."""
    import diffusers
    from transformers import CLIPTextModelWithProjection

    from sdlora.bases.single_file import load_tokenizer as folder_tokenizer
    if not (folder / "unet" / "config.json").is_file():
        raise BaseModelError(f"bundled configs missing in {folder}")
    torch.manual_seed(seed)
    read = lambda sub, f="config.json": json.loads((folder / sub / f).read_text())  # noqa: E731
    clip = lambda sub: CLIPTextConfig(**{k: v for k, v in read(sub).items() if not k.startswith("_")})  # noqa: E731
    unet = UNet2DConditionModel.from_config(read("unet"))
    vae = AutoencoderKL.from_config(read("vae"))
    text_encoder = CLIPTextModel(clip("text_encoder"))
    sched_cfg = read("scheduler", "scheduler_config.json")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    xl = (folder / "text_encoder_2").is_dir()
    family = "sdxl" if xl else _family_of(text_encoder.config.hidden_size, name)
    return Base(name=name, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=folder_tokenizer(folder),
                scheduler=scheduler, family=family, resolution=unet.config.sample_size * 8,
                text_encoder_2=CLIPTextModelWithProjection(clip("text_encoder_2")) if xl else None,
                tokenizer_2=folder_tokenizer(folder, "tokenizer_2") if xl else None)


RANDOM_BASES = {"sd15-random": "sd1", "sdxl-random": "sdxl"}   # full-size architectures, random weights


def tiny_random_xl_base(seed: int = 0, sample_size: int = 8) -> Base:
    """A very small SDXL-architecture pipeline with random weights (tests): both text encoders (CLIP-L-like and
    bigG-like with a projection, each 32 wide, so cross-attention reads 64), the text-and-size embedding, and
    SDXL's U-Net layout (three levels, no attention in the first, two layers per block, deeper transformers below),
    so its original-layout keys are SDXL's (input_blocks.4.1..., label_emb.0...)."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection

    from sdlora.bases.single_file import load_tokenizer as folder_tokenizer
    torch.manual_seed(seed)
    time_dim, width = 8, 32
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64), norm_num_groups=8, cross_attention_dim=2 * width,
        attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=width + 6 * time_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=sample_size * 8, scaling_factor=0.13025)
    config = dict(vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=width)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
                                                pad_token_id=1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config, hidden_act="gelu", bos_token_id=0,
                                                                eos_token_id=2, pad_token_id=1))
    folder = CONFIGS_DIR / families.variant("sdxl").config_folder
    scheduler = EulerDiscreteScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json")
                                                              .read_text()))
    return Base(name="tiny-random-xl", unet=unet, vae=vae, text_encoder=text_encoder,
                tokenizer=folder_tokenizer(folder), scheduler=scheduler, family="sdxl",
                resolution=sample_size * 8, text_encoder_2=text_encoder_2,
                tokenizer_2=folder_tokenizer(folder, "tokenizer_2"))


__all__ = ["Base", "BaseModelError", "Geometry", "load_base", "load_vae", "load_tokenizer", "native_resolution", "native_geometry",
           "tiny_random_base", "tiny_random_xl_base", "random_base_from_configs", "RANDOM_BASES"]
