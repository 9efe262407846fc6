"""Small random-weight Stable Diffusion bases in every form users keep them, for end-to-end tests.

Each variant of the family table (sd1, sd2-v, sd2-base) gets a tiny architecture with the family's
real widths (text encoder and cross-attention 768 for SD 1.x, 1024 for SD 2.x, so family detection
works as on real files), SD's 8x VAE and the real CLIP tokenizer. `config_root` writes bundled-style
config folders for them, so a test can point `sdlora.bases.single_file.CONFIG_ROOT` at it and load an
original-layout single file exactly as a user's full-size one is loaded. `StopAt` stops a run at a step,
as the Stop button does.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.bases import families
from sdlora.bases import single_file as ldm
from sdlora.training.events import Callbacks


def tiny_models(variant: str, seed: int = 0) -> dict[str, torch.nn.Module]:
    """unet, vae, text_encoder of a 64 px base with the variant's family widths; two layers per U-Net block
    as SD has, since A1111 maps U-Net keys by SD's block numbering (INTEROP.md section 1). SDXL: the small SDXL
    architecture of `tiny_random_xl_base` (its family shows in its keys, not its widths), both text encoders."""
    if families.family(variant).name == "sdxl":
        from sdlora.bases.load import tiny_random_xl_base
        base = tiny_random_xl_base(seed)
        return {"unet": base.unet.eval(), "vae": base.vae.eval(), "text_encoder": base.text_encoder.eval(),
                "text_encoder_2": base.text_encoder_2.eval()}
    width = families.family(variant).context_dim
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=width, attention_head_dim=8, use_linear_projection=width == 1024,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16, 16, 16), norm_num_groups=8, latent_channels=4, layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        te_cfg = CLIPTextConfig(hidden_size=width, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1,
                                vocab_size=49408, max_position_embeddings=77, projection_dim=width,
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    text_encoder = CLIPTextModel(te_cfg)
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval()}


def config_root(root: Path) -> Path:
    """A stand-in for sdlora/configs: each variant's config folder, with the tiny models' configs."""
    for name, var in families.VARIANTS.items():
        folder = ldm.write_diffusers_config_folder(name, root / var.config_folder)
        models = tiny_models(name)
        models["unet"].save_config(folder / "unet")
        models["vae"].save_config(folder / "vae")
        models["text_encoder"].config.to_json_file(folder / "text_encoder" / "config.json")
        if "text_encoder_2" in models:
            models["text_encoder_2"].config.to_json_file(folder / "text_encoder_2" / "config.json")
    return root


def single_file(path: Path, variant: str, seed: int = 0, say_variant: bool = False) -> Path:
    """An original-SD single file as other tools write it: no sdlora configs in its header and, unless
    `say_variant`, no word on which SD 2.x variant it is."""
    models = tiny_models(variant, seed)
    family = variant if say_variant else families.family(variant).name
    return ldm.save_single_file(path, **models, family=family, dtype=torch.float32, embed_configs=False)


def diffusers_xl_folder(path: Path, seed: int = 0) -> Path:
    """An SDXL diffusers pipeline folder (model_index.json, both text encoders and tokenizers)."""
    from diffusers import StableDiffusionXLPipeline

    from sdlora.bases.load import tiny_random_xl_base
    base = tiny_random_xl_base(seed)
    StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
                              tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=base.unet,
                              scheduler=base.scheduler, add_watermarker=False).save_pretrained(path)
    return path


def diffusers_folder(path: Path, variant: str = "sd1", seed: int = 0) -> Path:
    """A diffusers pipeline folder (model_index.json, configs, weights, tokenizer, scheduler)."""
    from diffusers import StableDiffusionPipeline

    from sdlora.bases.load import load_tokenizer
    var = families.variant(variant)
    models = tiny_models(variant, seed)
    import diffusers
    sched_cfg = diffusers.DDIMScheduler.load_config(ldm.config_dir(variant) / "scheduler")
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    pipe = StableDiffusionPipeline(**models, tokenizer=load_tokenizer(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    assert var.family == families.by_text_width(models["text_encoder"].config.hidden_size)
    return path


class StopAt(Callbacks):
    """Training callbacks that set `event` (the run's cancel event) when step `step` is done."""

    def __init__(self, step: int, event):
        self.step, self.event = step, event

    def on_step(self, info) -> None:
        if info.step == self.step:
            self.event.set()
