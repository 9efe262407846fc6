"""Which layout a LoRA file is in, and which base family it is for: tensor shapes first, then metadata."""
from __future__ import annotations

import torch

from sdlora.bases import families
from sdlora.loras.diffusers_layout import parse_diffusers_key
from sdlora.loras.layouts import COMFYUI_PARTS, COMFYUI_PREFIXES, KOHYA_PREFIXES


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """"kohya" | "comfyui" (diffusion_model./text_encoders. keys) | "diffusers" (unet./text_encoder.)
    | "peft" (bare module paths) | "unknown"."""
    if any(k.startswith(KOHYA_PREFIXES) for k in sd):
        return "kohya"
    if any(k.startswith(COMFYUI_PREFIXES) and k.endswith(tuple(COMFYUI_PARTS)) for k in sd):
        return "comfyui"
    parsed = {k: parse_diffusers_key(k) for k in sd}
    if any(p and k.startswith(("unet.", "text_encoder.")) for k, p in parsed.items()):
        return "diffusers"
    return "peft" if any(parsed.values()) else "unknown"


# A down weight is [rank, in]; a ComfyUI full delta (.diff) is [out, in]: both give the input width.
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight",
                  ".diff")


def detect_family(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """"sd1" | "sd2" | "sdxl" | "unknown": tensor shapes first, then kohya/ModelSpec metadata."""
    family = _family_from_shapes(sd)
    return family if family != families.UNKNOWN else _family_from_metadata(metadata or {})


def _family_from_shapes(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) for k in sd):
        return "sdxl"                                   # two text encoders: SDXL (INTEROP.md section 1)
    te = None
    for k, t in sd.items():
        if not k.endswith(_DOWN_SUFFIXES) or t.dim() < 2:
            continue
        flat = k.replace(".", "_").replace("processor_", "")
        by_width = families.by_context_dim(int(t.shape[1]))
        if ("attn2_to_k" in flat or "attn2_to_v" in flat) and by_width != families.UNKNOWN:
            return by_width                             # cross-attention k/v read the text embedding
        if te is None and k.startswith(("lora_te_", "text_encoder.", "text_encoders.")) and "q_proj" in flat:
            te = families.by_text_width(int(t.shape[1]))
    return te if te not in (None, families.UNKNOWN) else families.UNKNOWN


def _family_from_metadata(meta: dict[str, str]) -> str:
    """kohya's ss_base_model_version (A1111 reads it), then the ModelSpec architecture, then ss_v2."""
    for guess in (families.by_ss_version(str(meta.get("ss_base_model_version", ""))),
                  families.by_architecture(str(meta.get("modelspec.architecture", ""))),
                  families.by_ss_v2(str(meta.get("ss_v2", "")))):
        if guess != families.UNKNOWN:
            return guess
    return families.UNKNOWN


__all__ = ["detect_format", "detect_family"]
