"""The canonical in-memory LoRA and the kohya layout (A1111, ComfyUI and diffusers all load it).

One canonical in-memory form, ``LoraSet`` = {module key: ``LoraWeights``};
readers convert into it, writers out of it: kohya here, diffusers/PEFT in
``diffusers_layout``, ComfyUI's own in ``comfyui``; ``detect`` says which a file
is, ``metadata`` writes the header. Everything here is dict -> dict
(no nn.Module), so it is tested without a model. The rules come from the public
code of the consumers (summarised in docs/INTEROP.md); each is cited beside it.

Module keys are "unet.<diffusers module path>" or "text_encoder.<CLIP path>".
transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), so a
text-encoder path may come with or without "text_model."; files always carry
it (``canonical_key``), which is what A1111, ComfyUI and diffusers expect.
Readers given the base's module names return that base's own spelling.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from sdlora.safefiles import LoraFileError, atomic_write_bytes, read_lora_file, save_lora_file

# kohya-ss networks/lora.py prefixes of SD 1.x/2.x; SDXL's (lora_te1_ / lora_te2_) are sdlora.loras.naming's
COMPONENTS = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # diffusers lora_pipeline.py lora_state_dict
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
# ComfyUI's own layout (comfy_extras/nodes_lora_extract.py; comfy/lora.py load_lora reads these parts).
# Its reader is sdlora.loras.comfyui; the names live here because detect_format needs them.
COMFYUI_PREFIXES = ("diffusion_model.", "text_encoders.")
COMFYUI_PARTS = {".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight",
                 ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                 ".alpha": "alpha", ".dora_scale": "dora_scale", ".diff": "diff", ".diff_b": "diff_b"}
CLIP_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")      # children of CLIPTextTransformer
UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.")


@dataclass
class LoraWeights:
    """One adapted module: W' = W + strength * (alpha / rank) * up @ down."""
    down: torch.Tensor        # [rank, in] (Linear) | [rank, in, kh, kw] (Conv2d); = PEFT lora_A
    up: torch.Tensor          # [out, rank] (Linear) | [out, rank, 1, 1] (Conv2d); = PEFT lora_B
    alpha: float              # the real alpha; scale = alpha / rank
    dora_scale: torch.Tensor | None = None  # DoRA magnitude: [out, 1] per output row (PEFT) or [1, in] (LyCORIS)

    def __post_init__(self) -> None:
        d, u = self.down, self.up
        same = d.dim() == u.dim() == 2 or (d.dim() == u.dim() == 4 and tuple(u.shape[2:]) == (1, 1))
        if not (same and u.shape[1] == d.shape[0]):
            raise ValueError(f"LoRA pair does not fit: down {tuple(d.shape)}, up {tuple(u.shape)}; expected down "
                             "[rank, in] + up [out, rank] (Linear) or [rank, in, kh, kw] + [out, rank, 1, 1] (Conv2d)")
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} is not allowed: use a finite number > 0 (scale = alpha / rank)")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraSet = dict[str, LoraWeights]


def canonical_key(key: str) -> str:
    """The key as files spell it: a flattened text-encoder path gets its "text_model." back."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"LoRA key {key!r} must be 'unet.<module path>', 'text_encoder.<module path>' or "
                         "'text_encoder_2.<module path>'")
    if component.startswith("text_encoder") and path.startswith(CLIP_CHILDREN):
        path = "text_model." + path
    return f"{component}.{path}"


def kohya_name(key: str, naming=None) -> str:
    """"unet.a.b" -> "lora_unet_a_b"; "text_encoder.x" -> "lora_te_text_model_x" (INTEROP.md section 1); with a
    `naming` (sdlora.loras.naming, e.g. SDXL's) its name instead."""
    if naming is not None:
        return naming.name(key)
    component, path = canonical_key(key).split(".", 1)
    return f"{COMPONENTS[component]}_{path.replace('.', '_')}"


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous()


def scalar(t: torch.Tensor) -> float | None:
    """A 0-dim/1-element alpha as a float, rounded to fp32's 7 digits (so 0.1 stays 0.1); None if not scalar."""
    return float(f"{float(t.item()):.7g}") if t.numel() == 1 else None


# ---- kohya: lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha ---------------------------------

def to_kohya(loras: LoraSet, dtype: torch.dtype = torch.float16, naming=None) -> dict[str, torch.Tensor]:
    """kohya layout; ``.alpha`` is the real alpha as an fp32 0-dim tensor (every reader calls ``.item()``).
    `naming`: the base family's module names (sdlora.loras.naming; default SD 1.x/2.x's)."""
    sd: dict[str, torch.Tensor] = {}
    for key in sorted(loras):
        w, name = loras[key], kohya_name(key, naming)
        if f"{name}.alpha" in sd:
            raise ValueError(f"{key!r} and another module both become the kohya name {name!r}; drop one of them")
        sd[f"{name}.lora_down.weight"] = cast(w.down, dtype)
        sd[f"{name}.lora_up.weight"] = cast(w.up, dtype)
        sd[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.dora_scale is not None:
            sd[f"{name}.dora_scale"] = cast(w.dora_scale, dtype)
    return sd


def from_kohya(sd: dict[str, torch.Tensor], module_names: dict[str, set[str]],
               naming=None) -> tuple[LoraSet, list[str]]:
    """kohya layout -> LoraSet keyed by the given module paths, plus every key that could not be used.

    ``module_names`` = {"unet": {...}, "text_encoder": {...}} (the base's dotted paths); names are
    resolved by building kohya_name(path) -> path (``naming``'s names for SDXL), never by guessing where
    underscores were dots.
    Unusable: names of no given module (SDXL lora_te1_/lora_te2_ on SD 1.x), LoCon/LoHa parts,
    down without up, shapes that do not pair.
    """
    if naming is None:
        lookup = {kohya_name(f"{c}.{p}"): f"{c}.{p}" for c, names in module_names.items() if c in COMPONENTS
                  for p in names}
    else:
        lookup = {n: f"{c}.{p}" for c, names in module_names.items() if c in naming.prefixes
                  for p in names for n in naming.names(f"{c}.{p}")}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        name, _, part = k.partition(".")
        groups.setdefault(name, {})[part] = t
    loras: LoraSet = {}
    unused: list[str] = []
    for name, parts in groups.items():
        w = kohya_weights(parts) if name in lookup else None
        if w is None:
            unused += [f"{name}.{p}" if p else name for p in parts]
        else:
            loras[lookup[name]] = w
    return loras, sorted(unused)


def kohya_weights(parts: dict[str, torch.Tensor]) -> LoraWeights | None:
    if set(parts) - set(KOHYA_PARTS) or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        return None                           # LoCon mid / LoHa / half a pair: not a plain LoRA module
    down = parts["lora_down.weight"]
    alpha = scalar(parts["alpha"]) if "alpha" in parts else 0.0
    if alpha is None:                         # an alpha that is not one number
        return None
    if not alpha:                             # no (or 0) alpha means alpha = rank: kohya networks/lora.py, A1111
        alpha = float(down.shape[0])
    try:
        return LoraWeights(down, parts["lora_up.weight"], alpha, parts.get("dora_scale"))
    except ValueError:
        return None


def most_common(values):
    """The value that occurs most often (the first of a tie)."""
    return Counter(values).most_common(1)[0][0]


def module_resolver(module_names: dict[str, set[str]] | None):
    """canonical key -> the base's own module key (None when the base has no such module); the identity
    when no module names are given."""
    if module_names is None:
        return lambda ck: ck
    table = {canonical_key(f"{c}.{p}"): f"{c}.{p}" for c, names in module_names.items() if c in COMPONENTS
             for p in names}
    return table.get


__all__ = ["LoraWeights", "LoraSet", "COMPONENTS", "KOHYA_PREFIXES", "KOHYA_PARTS", "COMFYUI_PREFIXES", "COMFYUI_PARTS",
           "canonical_key", "kohya_name", "to_kohya", "from_kohya", "most_common", "module_resolver", "scalar",
           "kohya_weights", "cast", "CLIP_CHILDREN", "UNET_ROOTS",
           "LoraFileError", "atomic_write_bytes", "save_lora_file", "read_lora_file"]
