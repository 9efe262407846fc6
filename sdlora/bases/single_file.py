"""Original-SD ("LDM") single-file checkpoints, the layout A1111 and ComfyUI load.

One file holds three models under three prefixes:
  model.diffusion_model.*  UNet           (key rules: `sdlora.bases.ldm_unet`)
  first_stage_model.*      VAE            (key rules: `sdlora.bases.ldm_keys`)
  cond_stage_model.*       text encoder:  SD 1.x `transformer.text_model.*` (transformers CLIP),
                                          SD 2.x `model.*` (open_clip, fused q/k/v `in_proj`)
  conditioner.embedders.{0,1}.*  SDXL's two: CLIP ViT-L as SD 1.x's, OpenCLIP bigG as SD 2.x's plus
                                 its text_projection (`sdlora.bases.ldm_keys`; docs/SDXL.md)
This module splits and joins the prefixes, and builds the diffusers/transformers
modules offline from the bundled configs in `sdlora/configs/<sd15|sd21|sd21-base|sdxl>/`
(or the configs an sdlora file carries) and the CLIP BPE files in
`sdlora/assets/clip_tokenizer/` (SD 2 uses the same vocabulary with pad "!").
Which family and variant a file is comes from `sdlora.bases.variants`.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from sdlora.bases import families
from sdlora.safefiles import LoraFileError, atomic_write, read_pickle
from sdlora.bases.ldm_keys import (LDM_TEXT_PREFIX, LDM_UNET_PREFIX, LDM_VAE_PREFIX, SDXL_TEXT_PREFIXES,
                                   CheckpointError, StateDict, normalize_family, sdxl_text_encoders_from_ldm,
                                   sdxl_text_encoders_to_ldm, text_encoder_from_ldm, text_encoder_to_ldm,
                                   vae_from_ldm, vae_to_ldm)
from sdlora.bases.variants import (EMBEDDED_CONFIGS_KEY, choose_variant, context_width, detect_checkpoint_family,
                                    detect_family_from_shapes, embedded_configs, header_metadata, model_configs,
                                    read_header, refuse_unsupported, variant_metadata)
from sdlora.bases.ldm_unet import ldm_module_names, unet_from_ldm, unet_to_ldm

__all__ = ["CheckpointError", "detect_checkpoint_family", "ldm_module_names", "load_single_file",
           "pipeline_to_ldm", "read_state_dict", "save_single_file", "split_pipeline", "text_encoder_from_ldm",
           "text_encoder_to_ldm", "unet_from_ldm", "unet_to_ldm", "vae_from_ldm", "vae_to_ldm",
           "config_dir", "load_tokenizer", "write_diffusers_config_folder", "native_configs"]

CONFIG_ROOT = Path(__file__).parent.parent / "configs"
TOKENIZER_DIR = Path(__file__).parent.parent / "assets" / "clip_tokenizer"
# Tensors many original files carry that no diffusers module holds: LDM's DDPM
# schedule buffers (the scheduler config rebuilds them) and the EMA copy.
_IGNORED = frozenset({"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                      "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                      "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                      "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                      "logvar", "scale_factor", "lvlb_weights"})
_IGNORED_PREFIXES = ("model_ema.", "denoiser.")     # SGM files may carry their denoiser's sigma table


def config_dir(family: str) -> Path:
    """The bundled diffusers-layout config folder of a family or variant name (any spelling)."""
    normalize_family(family)
    return CONFIG_ROOT / families.variant(family).config_folder


def pipeline_to_ldm(unet_sd: StateDict, vae_sd: StateDict, te_sd: StateDict, family: str) -> StateDict:
    """Three diffusers-layout state dicts -> one original-SD single-file state dict."""
    fam = normalize_family(family)
    width, need = context_width({k: tuple(v.shape) for k, v in unet_sd.items()}), families.family(fam).context_dim
    # a standard width of another family is a mistake; a small base of its own width (the built-in one) is not
    if width is not None and width != need and families.by_context_dim(width) != families.UNKNOWN:
        raise CheckpointError(f"family={family!r} needs cross-attention width {need}, the UNet has {width}")
    out: StateDict = {}
    for prefix, part in ((LDM_UNET_PREFIX, unet_to_ldm(unet_sd)), (LDM_VAE_PREFIX, vae_to_ldm(vae_sd)),
                         (LDM_TEXT_PREFIX, text_encoder_to_ldm(te_sd, fam))):
        out.update((prefix + k, v) for k, v in part.items())
    return out


def sdxl_pipeline_to_ldm(unet_sd: StateDict, vae_sd: StateDict, te1_sd: StateDict, te2_sd: StateDict) -> StateDict:
    """SDXL's four diffusers/transformers state dicts -> one SGM single-file state dict."""
    out = {LDM_UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_sd).items()}
    out.update((LDM_VAE_PREFIX + k, v) for k, v in vae_to_ldm(vae_sd).items())
    out.update(sdxl_text_encoders_to_ldm(te1_sd, te2_sd))
    return out


def split_pipeline(sd: StateDict, source: str = "state dict", family: str = "sd1") -> tuple[StateDict, ...]:
    """Original-SD state dict -> (unet, vae, text) parts, prefixes kept; for SDXL (unet, vae, text 1, text 2).
    Unknown keys raise."""
    prefixes = (LDM_UNET_PREFIX, LDM_VAE_PREFIX) + (SDXL_TEXT_PREFIXES if family == "sdxl" else (LDM_TEXT_PREFIX,))
    parts: tuple[StateDict, ...] = tuple({} for _ in prefixes)
    unknown = []
    for k, v in sd.items():
        if k in _IGNORED or k.startswith(_IGNORED_PREFIXES):
            continue
        for part, prefix in zip(parts, prefixes):
            if k.startswith(prefix):
                part[k] = v
                break
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} key(s) belong to no known part: {sorted(unknown)[:12]}")
    names = ("UNet", "VAE") + (("first text encoder", "second text encoder") if family == "sdxl" else ("text encoder",))
    empty = [f"{n} ({p}*)" for n, p, part in zip(names, prefixes, parts) if not part]
    if empty:
        raise CheckpointError(f"{source}: no weights for the {', '.join(empty)}; a full SD checkpoint is needed")
    return parts


def native_configs(path: str | os.PathLike) -> tuple[dict, dict]:
    """(U-Net config, VAE config) a `.safetensors` checkpoint will load with: its own, or its variant's bundled
    ones; read from its header, no tensor loaded."""
    path = Path(path)
    shapes, meta = read_header(path)
    refuse_unsupported(path, shapes)
    var = choose_variant(path, detect_family_from_shapes(shapes), None, None, meta)
    own = embedded_configs(path, meta)
    folder = CONFIG_ROOT / var.config_folder
    unet = own.get("unet") or json.loads((folder / "unet" / "config.json").read_text())
    vae = own.get("vae") or json.loads((folder / "vae" / "config.json").read_text())
    return unet, vae


def read_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> StateDict:
    """Tensors of a `.safetensors` file; pickled `.ckpt/.pt/.pth/.bin` only with `allow_pickle=True`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e
    if path.suffix not in (".ckpt", ".pt", ".pth", ".bin"):
        raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; use a .safetensors file")
    try:                                       # the same reader as any pickled file: weights_only, tensors only
        return read_pickle(path, allow_pickle, kind="checkpoint")
    except LoraFileError as e:
        raise CheckpointError(str(e)) from None


def load_single_file(path: str | os.PathLike, *, family: str | None = None, dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None, allow_pickle: bool = False,
                     config: str | os.PathLike | None = None) -> dict[str, Any]:
    """Build diffusers/transformers modules from an original-SD SD 1.x/2.x or SGM SDXL file, offline.

    Returns {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "family", "variant",
    "prediction_type"}, and for SDXL "text_encoder_2" and "tokenizer_2": "family" is the family table's name ("sd1" / "sd2"), "variant" the bundled
    config used ("sd1", "sd2-v", "sd2-base"; see `single_file_variant`). `config` replaces the bundled
    config folder with another diffusers-layout one. `prediction_type` ("epsilon" / "v_prediction")
    picks the SD 2.x variant and overrides the scheduler config's.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} is not allowed: use 'epsilon' or 'v_prediction'")
    path = Path(path)
    sd = read_state_dict(path, allow_pickle=allow_pickle)
    header = header_metadata(path)
    refuse_unsupported(path, {k: tuple(v.shape) for k, v in sd.items()})
    var = choose_variant(path, detect_checkpoint_family(sd), family, prediction_type, header)
    folder = Path(config) if config is not None else CONFIG_ROOT / var.config_folder
    # sdlora's own files carry their models' configs: a merged built-in base loads back as itself
    own = {} if config is not None else embedded_configs(path, header)
    name = var.name if not own else f"{var.name}, configs from the file"
    unet_sd, vae_sd, *te_sds = split_pipeline(sd, str(path), var.family)
    del sd
    unet_cfg = dict(own.get("unet") or UNet2DConditionModel.load_config(folder / "unet"))
    conv_in, conv_out = (unet_sd.get(LDM_UNET_PREFIX + k) for k in ("input_blocks.0.0.weight", "out.2.weight"))
    if conv_in is not None and conv_out is not None:  # inpainting models take 9 input channels
        unet_cfg.update(in_channels=conv_in.shape[1], out_channels=conv_out.shape[0])
    unet = _build(lambda: UNet2DConditionModel.from_config(unet_cfg),
                  unet_from_ldm(unet_sd, unet_cfg), dtype, f"{path}: UNet ({name} config)")
    del unet_sd
    vae_cfg = own.get("vae") or AutoencoderKL.load_config(folder / "vae")
    vae = _build(lambda: AutoencoderKL.from_config(vae_cfg), vae_from_ldm(vae_sd, vae_cfg),
                 dtype, f"{path}: VAE ({name} config)")
    te_config = own.get("text_encoder") or folder / "text_encoder" / "config.json"
    scheduler = _build_scheduler(folder, prediction_type)
    out = {"tokenizer": load_tokenizer(folder), "scheduler": scheduler, "family": var.family, "variant": var.name,
           "prediction_type": scheduler.config.prediction_type, "unet": unet, "vae": vae}
    if var.family != "sdxl":
        out["text_encoder"] = _build_text_encoder(te_config, te_sds[0], dtype, f"{path}: text encoder ({name} config)")
        return out
    te2_config = own.get("text_encoder_2") or folder / "text_encoder_2" / "config.json"
    prefix = _text_model_prefix(_clip_config(te_config))
    one, two = sdxl_text_encoders_from_ldm(te_sds[0], te_sds[1], _clip_config(te2_config).to_dict(),
                                           text_model_prefix=prefix)
    out["text_encoder"] = _build_text_encoder(te_config, one, dtype, f"{path}: first text encoder ({name} config)",
                                              converted=True)
    out["text_encoder_2"] = _build_text_encoder(te2_config, two, dtype, f"{path}: second text encoder ({name} config)",
                                                converted=True, projection=True)
    out["tokenizer_2"] = load_tokenizer(folder, "tokenizer_2")
    return out


def _clip_config(config: dict | Path):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(**config) if isinstance(config, dict) else CLIPTextConfig.from_json_file(config)


def _text_model_prefix(cfg) -> str:
    """'text_model.' when this transformers names CLIPTextModel weights text_model.* (< 5), else ''."""
    from transformers import CLIPTextModel
    with torch.device("meta"):
        first_key = next(iter(CLIPTextModel(cfg).state_dict()))
    return "text_model." if first_key.startswith("text_model.") else ""


def _build_text_encoder(config: dict | Path, te_sd: StateDict, dtype: torch.dtype, what: str,
                        converted: bool = False, projection: bool = False) -> torch.nn.Module:
    """A CLIPTextModel (or, with `projection`, SDXL's CLIPTextModelWithProjection) holding `te_sd`: original-SD
    keys, or transformers keys already (`converted`)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = _clip_config(config)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    if not converted:   # transformers < 5 names the weights text_model.*, 5 does not
        te_sd = text_encoder_from_ldm(te_sd, cfg.to_dict(), text_model_prefix=_text_model_prefix(cfg))
    return _build(lambda: cls(cfg), te_sd, dtype, what)


def _build_scheduler(folder: Path, prediction_type: str | None):
    import diffusers

    cfg = dict(diffusers.DDIMScheduler.load_config(folder / "scheduler"))  # any scheduler class reads the file
    if prediction_type is not None:
        cfg["prediction_type"] = prediction_type
    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def _build(make: Callable[[], torch.nn.Module], sd: StateDict, dtype: torch.dtype, what: str) -> torch.nn.Module:
    """Module from `make()` holding exactly `sd`; every mismatch is reported at once.

    Built on the meta device and filled with `assign=True` (no random init, no
    second copy); a module with non-persistent buffers (CLIP's position_ids)
    is then rebuilt for real.
    """
    with torch.device("meta"):
        model = make()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {expected[k]}" for k in sorted(set(sd) & set(expected))
              if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:
        problems = [f"{label} ({len(items)}): {items[:8]}" for label, items in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape, file vs model", shapes))
                    if items]
        raise CheckpointError(f"{what} does not fit: " + "; ".join(problems))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)  # now holds `sd`'s tensors, already in `dtype`
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = make().to(dtype)
        model.load_state_dict(sd, strict=True)
    return model.eval()


def load_tokenizer(config_folder: str | os.PathLike, sub: str = "tokenizer"):
    """CLIPTokenizer for a diffusers-layout folder (e.g. `config_dir("sd21")`; `sub` "tokenizer_2" for SDXL's
    second one).

    Its `tokenizer/` holds only the special tokens (SD 2 and SDXL's second tokenizer pad with "!"); the BPE
    files are read from `sdlora/assets/clip_tokenizer/` unless it has its own.
    """
    from transformers import CLIPTokenizer

    tok_dir = Path(config_folder) / sub
    cfg_file = tok_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    vocab_dir = tok_dir if (tok_dir / "vocab.json").is_file() else TOKENIZER_DIR
    if not (vocab_dir / "vocab.json").is_file() or not (vocab_dir / "merges.txt").is_file():
        raise FileNotFoundError(f"CLIP tokenizer files missing: need vocab.json and merges.txt in {vocab_dir}")
    keys = ("pad_token", "bos_token", "eos_token", "unk_token", "model_max_length")
    return CLIPTokenizer.from_pretrained(str(vocab_dir), **{k: cfg[k] for k in keys if k in cfg})


def write_diffusers_config_folder(family: str, dest: str | os.PathLike) -> Path:
    """A complete diffusers-layout config folder (configs + tokenizer files, no weights) at `dest`,
    e.g. for diffusers' `from_single_file(path, config=dest, local_files_only=True)`."""
    dest = Path(dest)
    shutil.copytree(config_dir(family), dest, dirs_exist_ok=True)
    for sub in ("tokenizer", "tokenizer_2"):
        if (dest / sub).is_dir():
            for name in ("vocab.json", "merges.txt"):
                shutil.copy2(TOKENIZER_DIR / name, dest / sub / name)
    return dest


def save_single_file(path: str | os.PathLike, unet: torch.nn.Module, vae: torch.nn.Module,
                     text_encoder: torch.nn.Module, family: str, dtype: torch.dtype = torch.float16,
                     metadata: Mapping[str, str] | None = None, prediction_type: str | None = None,
                     embed_configs: bool = True, text_encoder_2: torch.nn.Module | None = None) -> Path:
    """Write an original-SD `.safetensors` atomically (temp file beside it, fsync, os.replace).

    The header says which variant it is (ModelSpec keys, when known) and, unless `embed_configs` is
    False, holds the three models' configs, so sdlora loads a file of any architecture back (A1111 and
    ComfyUI ignore both and use their own configs, which fit the standard architectures only).

    Floating tensors are cast to `dtype`; integer ones (position_ids) keep theirs.
    Not written: LDM's DDPM schedule buffers and, for SD 2, open_clip's unused
    last block / text_projection (loaders rebuild or ignore them).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"path={str(path)!r}: use a name ending in .safetensors")
    meta = {"format": "pt", **variant_metadata(family, prediction_type), **(metadata or {})}
    if embed_configs:
        meta[EMBEDDED_CONFIGS_KEY] = model_configs(unet, vae, text_encoder, text_encoder_2)
    bad = {k: v for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"metadata values must be strings: {bad!r}")
    if normalize_family(family) == "sdxl":
        if text_encoder_2 is None:
            raise ValueError("an SDXL single file needs both text encoders (text_encoder_2 is missing)")
        sd = sdxl_pipeline_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
                                  text_encoder_2.state_dict())
    else:
        sd = pipeline_to_ldm(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), family)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return path
