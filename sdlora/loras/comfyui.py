"""ComfyUI's own LoRA layout -> the canonical ``LoraSet`` (format name "comfyui").

ComfyUI's "Extract and Save Lora" node (comfy_extras/nodes_lora_extract.py, ``calc_lora_model``)
writes the keys of ComfyUI's own model state dicts plus a part name:

  diffusion_model.<original-SD U-Net path>.lora_up.weight / .lora_down.weight   (no .alpha: alpha = rank)
  text_encoders.clip_l.transformer.text_model.<CLIP path>.lora_up.weight / ...  (SD 1.x; SD 2.x: clip_h,
                                                    comfy/sd2_clip.py; SDXL adds clip_g)
  <path>.diff     a full weight delta: every weight in "full_diff" mode; in "standard" mode with
                  bias_diff (on by default) the 1-D weights (GroupNorm / LayerNorm)
  <path>.diff_b   a bias delta (bias_diff)

ComfyUI loads these names directly (comfy/lora.py ``model_lora_keys_unet`` / ``model_lora_keys_clip``:
"generic lora format"), reads ``.alpha`` / ``.dora_scale`` and the lora_A / lora_B spellings when
present (``load_lora``), and applies W += strength * diff for ``.diff`` and bias += strength * diff_b.

What sdlora does with the full deltas: a ``.diff`` of a Linear / Conv2d weight becomes an exact
LoRA pair (one factor is the identity, alpha = rank), so it applies at any strength as in ComfyUI.
1-D ``.diff`` (norm weights) and ``.diff_b`` (biases) change tensors that no LoRA pair reaches;
they are returned as unused keys and ``unapplied_note`` says so (never dropped silently).
"""
from __future__ import annotations

from typing import Mapping

import torch

from sdlora.bases.ldm_unet import UnetLayout, unet_path_from_ldm
from sdlora.loras import layouts
from sdlora.loras.layouts import COMFYUI_PARTS, LoraSet, LoraWeights, canonical_key

UNET_PREFIX, TEXT_PREFIX = layouts.COMFYUI_PREFIXES
# ComfyUI's CLIP model names (comfy/sd1_clip.py SD1ClipModel "clip_l", comfy/sd2_clip.py "clip_h").
# clip_g is SDXL's second encoder: no module of an SD 1.x / 2.x base, so its keys stay unused.
_TEXT_ENCODERS = ("clip_l", "clip_h")
# Only the CLIPTextTransformer ("text_model.") is in SD's text encoder; ComfyUI's CLIP also holds a
# text_projection (comfy/clip_model.py) that SD 1.x / 2.x bases do not have.
_CLIP_ROOT = "transformer.text_model."
_CANDIDATE_L = (2, 1, 3)          # layers_per_block to try without a config, SD's own first


def from_comfyui(sd: dict[str, torch.Tensor], module_names: dict[str, set[str]] | None = None,
                 unet_config: Mapping | None = None) -> tuple[LoraSet, list[str]]:
    """ComfyUI layout -> LoraSet, plus every key that could not be used.

    U-Net paths are converted from the original-SD numbering with the base's ``layers_per_block``
    (``unet_config``; without it, the numbering under which most keys map). Keys are canonical
    ("text_model." kept) unless ``module_names`` is given; then they are the base's own paths and
    keys of other modules are unusable.
    """
    lpb = _layers_per_block(sd, unet_config)
    resolve = layouts.module_resolver(module_names)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unused: list[str] = []
    for k, t in sd.items():
        split = _split(k)
        ck = _module_key(split[0], lpb) if split else None
        if ck is None or split[1] in groups.get(ck, {}):     # lora_A beside lora_down: keep one, list the other
            unused.append(k)
        else:
            groups.setdefault(ck, {})[split[1]] = (k, t)
    loras: LoraSet = {}
    for ck, parts in groups.items():
        key = resolve(ck)
        w, used = _weights(parts) if key else (None, ())
        if w is not None:
            loras[key] = w
        unused += [k for part, (k, _) in parts.items() if part not in used]
    return loras, sorted(unused)


def unapplied_note(path, unused: list[str]) -> str | None:
    """A sentence for the user when ComfyUI bias / norm deltas are not applied; None when there are none."""
    deltas = [k for k in unused if k.endswith((".diff", ".diff_b"))]
    if not deltas:
        return None
    return (f"{path}: {len(deltas)} full bias/norm deltas (.diff_b, 1-D .diff, e.g. {deltas[0]}) are not "
            "applied: sdlora applies LoRA pairs and full weight deltas only, so images differ slightly from "
            "ComfyUI's. To match exactly, extract the LoRA in ComfyUI with bias_diff off")


def _split(key: str) -> tuple[str, str] | None:
    """'<module path>.<part>' -> (module path, canonical part); None for parts sdlora does not read."""
    for suffix, part in COMFYUI_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _module_key(path: str, layers_per_block: int) -> str | None:
    """'diffusion_model.<LDM path>' / 'text_encoders.clip_l.transformer.text_model.<path>' -> LoraSet key."""
    if path.startswith(UNET_PREFIX):
        unet = unet_path_from_ldm(path[len(UNET_PREFIX):], layers_per_block)
        return None if unet is None else "unet." + unet
    if not path.startswith(TEXT_PREFIX):
        return None
    clip, _, rest = path[len(TEXT_PREFIX):].partition(".")
    if clip not in _TEXT_ENCODERS or not rest.startswith(_CLIP_ROOT) or rest == _CLIP_ROOT:
        return None
    return canonical_key("text_encoder." + rest[len("transformer."):])


def _layers_per_block(sd: dict, unet_config: Mapping | None) -> int:
    """The LDM numbering's L (ldm_unet's module docstring): from the config; without one (inspect), the
    L under which most U-Net keys map, preferring SD 1.x / 2.x's 2 (input_blocks.2.0.op, say, maps
    only with L = 1: it is the first downsampler there)."""
    if unet_config:
        return UnetLayout.from_config(unet_config).layers_per_block
    paths = {s[0][len(UNET_PREFIX):] for k in sd if (s := _split(k)) and s[0].startswith(UNET_PREFIX)}
    return max(_CANDIDATE_L, key=lambda n: sum(unet_path_from_ldm(p, n) is not None for p in paths))


def _weights(parts: dict[str, tuple[str, torch.Tensor]]) -> tuple[LoraWeights | None, tuple[str, ...]]:
    """One module's parts -> (LoraWeights, the parts it used)."""
    diff = parts.get("diff")
    if diff is not None and diff[1].dim() >= 2:
        # ComfyUI's "diff" patch replaces a LoRA patch of the same weight (comfy/lora.py load_lora
        # assigns it last), so a pair beside a .diff is unused there too.
        w = _pair_from_delta(diff[1])
        return w, (("diff",) if w else ())
    pair = {p: t for p, (_, t) in parts.items() if p in layouts.KOHYA_PARTS}
    w = layouts.kohya_weights(pair)             # the kohya rules: no alpha means alpha = rank
    return w, (tuple(pair) if w else ())


def _pair_from_delta(diff: torch.Tensor) -> LoraWeights | None:
    """An exact pair with (alpha / rank) * up @ down == diff: one factor is the identity, alpha = rank.

    The rank is the smaller side for a Linear; a Conv2d keeps the kernel in ``down`` (the canonical
    conv pair is down [r, in, kh, kw] + up [out, r, 1, 1]), so there the rank is out_channels.
    """
    out = diff.shape[0]
    try:
        if diff.dim() == 2 and diff.shape[1] < out:
            return LoraWeights(down=torch.eye(diff.shape[1], dtype=diff.dtype), up=diff, alpha=diff.shape[1])
        eye = torch.eye(out, dtype=diff.dtype)
        return LoraWeights(down=diff, up=eye if diff.dim() == 2 else eye[:, :, None, None], alpha=out)
    except ValueError:                            # a 3-D or 5-D tensor: no Linear / Conv2d weight
        return None


__all__ = ["from_comfyui", "unapplied_note"]
