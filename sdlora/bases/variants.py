"""Which family and variant an original-SD single file is, read from its header (no tensor loaded).

The family (SD 1.x / 2.x / SDXL) is in the key names and shapes. What the weights cannot say, whether
an SD 2.x model predicts noise (512 "base") or v (768), `choose_variant` decides from, in order: the
caller's `family` (a variant name of `sdlora.bases.families`, e.g. "sd2-base") or `prediction_type`;
the file's ModelSpec header (`modelspec.prediction_type`, `modelspec.architecture`, which sdlora's
merges write); an A1111-style `<name>.yaml` beside the file (`parameterization: "v"` means v, none
means epsilon); else the 768 v model, as diffusers also assumes, with a warning. sdlora's own files
also carry their three models' configs (`EMBEDDED_CONFIGS_KEY`), so any architecture loads back.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch

from sdlora.bases import families
from sdlora.bases.ldm_keys import LDM_TEXT_PREFIX, LDM_UNET_PREFIX, CheckpointError, normalize_family


def detect_checkpoint_family(sd: Mapping[str, torch.Tensor]) -> str:
    """'sd1' | 'sd2' | 'sdxl' | 'unknown' from an original-SD state dict's keys and shapes.

    Text encoder first (`cond_stage_model.transformer` = SD 1, `.model` = SD 2,
    `conditioner.embedders` = SDXL), else the UNet's cross-attention width
    (768 / 1024 / 2048, 1280 for the SDXL refiner). v-prediction is not visible
    in weights: SD 2 768 models are v, SD 2 512 "base" models are epsilon.
    """
    return detect_family_from_shapes({k: tuple(v.shape) for k, v in sd.items()})


def detect_family_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """detect_checkpoint_family from key names and shapes alone (a safetensors header holds both)."""
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        return "sdxl"
    if any(k.startswith(LDM_TEXT_PREFIX + "model.") for k in shapes):
        return "sd2"
    if any(k.startswith(LDM_TEXT_PREFIX + "transformer.") for k in shapes):
        return "sd1"
    width = context_width(shapes, LDM_UNET_PREFIX)
    return "sdxl" if width == SDXL_REFINER_WIDTH else families.by_context_dim(width)


SDXL_REFINER_WIDTH = 1280    # the SDXL refiner's cross-attention reads only OpenCLIP ViT-bigG's 1280 states


def context_width(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> int | None:
    for k, shape in shapes.items():
        if k.startswith(prefix) and k.endswith("attn2.to_k.weight"):
            return shape[-1]  # [inner, context_dim]
    return None


def single_file_variant(path: str | os.PathLike, family: str | None = None) -> families.Variant:
    """The bundled variant a `.safetensors` checkpoint loads as, read from its header only (no tensors)."""
    shapes, meta = read_header(Path(path))
    refuse_unsupported(Path(path), shapes)
    return choose_variant(Path(path), detect_family_from_shapes(shapes), family, None, meta)


REFINER_PREFIX = "conditioner.embedders.0.model."      # the refiner's one embedder: OpenCLIP bigG, at index 0


def sdxl_kind(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'base' | 'refiner' | 'inpaint' of an SDXL file (diffusers single_file_utils infer_diffusers_model_type
    tells them apart the same way: the refiner's only embedder is bigG, at index 0; inpainting takes 9 channels)."""
    if shapes.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1] == 9:
        return "inpaint"
    if any(k.startswith(REFINER_PREFIX) for k in shapes) or context_width(shapes, LDM_UNET_PREFIX) == SDXL_REFINER_WIDTH:
        return "refiner"
    return "base"


def refuse_unsupported(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """One clear error for an SDXL checkpoint that is not a text-to-image base (refiner, inpainting)."""
    if detect_family_from_shapes(shapes) != "sdxl":
        return
    kind = sdxl_kind(shapes)
    if kind == "refiner":
        raise CheckpointError(f"{path}: this is the SDXL refiner (its only text encoder is OpenCLIP bigG, 1280-wide "
                              "cross-attention): it refines other models' images and is not trained on. Use an SDXL "
                              "base checkpoint or a fine-tune of one")
    if kind == "inpaint":
        raise CheckpointError(f"{path}: this is an SDXL inpainting checkpoint (9 input channels: image, mask and "
                              "latents); style LoRAs are trained on a text-to-image base. Use an SDXL base checkpoint")


def read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) of a .safetensors file, without reading a tensor."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e


EMBEDDED_CONFIGS_KEY = "sdlora_configs"   # header metadata: {"unet", "vae", "text_encoder"} model configs as JSON


def model_configs(unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                  text_encoder_2: torch.nn.Module | None = None) -> str:
    """The models' configs as one JSON string, for a single file's header."""
    def te(model):
        return {k: v for k, v in model.config.to_dict().items() if not k.startswith("_")}
    configs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te(text_encoder)}
    if text_encoder_2 is not None:
        configs["text_encoder_2"] = te(text_encoder_2)
    return json.dumps(configs, default=list)


def embedded_configs(path: Path, header: Mapping[str, str]) -> dict[str, dict]:
    raw = header.get(EMBEDDED_CONFIGS_KEY)
    if not raw:
        return {}
    try:
        configs = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: its header's {EMBEDDED_CONFIGS_KEY!r} is not JSON ({e}); delete that "
                              "entry to load it with the bundled configs") from None
    if not isinstance(configs, dict) or not all(isinstance(configs.get(k), dict) for k in
                                                ("unet", "vae", "text_encoder")):
        raise CheckpointError(f"{path}: its header's {EMBEDDED_CONFIGS_KEY!r} lacks the unet, vae and "
                              "text_encoder configs")
    return configs


def header_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def choose_variant(path: Path, detected: str, family: str | None, prediction_type: str | None,
                    meta: Mapping[str, str]) -> families.Variant:
    if detected == families.UNKNOWN:
        raise CheckpointError(f"{path}: not an SD 1.x/2.x/SDXL checkpoint in original-SD layout (no cond_stage_model.*, "
                              "conditioner.embedders.* or model.diffusion_model.* cross-attention keys)")
    if family is not None and normalize_family(family) != detected:
        raise CheckpointError(f"{path}: family={family!r} was asked for, but the weights are {detected}")
    if family is not None and family not in families.FAMILIES:
        return families.variant(family)                   # a variant name: nothing left to guess
    pred = prediction_type or prediction_evidence(path, meta)
    if pred is not None:
        found = families.variant_for(detected, pred)
        if found is not None:
            return found
    chosen = families.variant(detected)
    if family is None and len([v for v in families.VARIANTS.values() if v.family == detected]) > 1:
        others = [v.name for v in families.VARIANTS.values() if v.family == detected and v is not chosen]
        warnings.warn(f"{path}: {families.title(detected)} file with no word on what it predicts; assuming "
                      f"{chosen.resolution}px {chosen.prediction_type} ({chosen.name}). If it is another variant "
                      f"({', '.join(others)}), put the A1111 .yaml it came with beside it as {path.stem}.yaml",
                      stacklevel=3)
    return chosen


def prediction_evidence(path: Path, meta: Mapping[str, str]) -> str | None:
    """What the file says it predicts: its ModelSpec header, then an A1111 `<name>.yaml` beside it."""
    pred = str(meta.get("modelspec.prediction_type", ""))
    if pred in ("epsilon", "v", "v_prediction"):
        return pred
    arch = str(meta.get("modelspec.architecture", ""))
    for v in families.VARIANTS.values():
        if arch.split("/")[0] == v.modelspec_architecture:
            return v.prediction_type
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():                                    # A1111 reads this config beside a checkpoint
        text = yaml.read_text(encoding="utf-8", errors="replace")
        return "v" if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) else "epsilon"
    return None


def variant_metadata(family: str, prediction_type: str | None) -> dict[str, str]:
    """ModelSpec keys that tell a loader which variant the file is (what the weights cannot say), when known:
    from `prediction_type`, or from a name that picks one variant ("sd2-base", "sd21", "sd1")."""
    fam = families.family(family)
    several = sum(v.family == fam.name for v in families.VARIANTS.values()) > 1
    if prediction_type is None and family == fam.name and several:
        return {}
    var = (families.variant_for(fam.name, prediction_type) if prediction_type else None) or families.variant(family)
    return {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": var.modelspec_architecture,
            "modelspec.prediction_type": "v" if var.prediction_type == "v_prediction" else "epsilon"}


__all__ = ["detect_checkpoint_family", "detect_family_from_shapes", "single_file_variant", "sdxl_kind",
           "refuse_unsupported", "prediction_evidence",
           "choose_variant", "embedded_configs", "header_metadata", "variant_metadata", "model_configs",
           "context_width", "read_header", "detect_family_from_shapes", "EMBEDDED_CONFIGS_KEY"]
