"""What a LoRA file holds, in plain figures (``sdlora inspect``, the web UI's library).

Modules, ranks and alphas come from the same readers ``generate.read_lora`` uses (one parser
per layout), so inspect reports what generation applies; only kohya files are counted from their
keys, because ``from_kohya`` needs the base's module names to undo the underscores.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sdlora.bases import families
from sdlora.loras import detect
from sdlora.loras import diffusers_layout
from sdlora.loras import layouts as formats
from sdlora.loras.comfyui import from_comfyui

_KOHYA_DOWN = ".lora_down.weight"


def _modules(sd: dict, meta: dict, fmt: str) -> tuple[dict[str, tuple[int, float]], int]:
    """(module name -> (rank, alpha) as a reader loads it, number of keys in no module)."""
    if fmt == "kohya":
        return _kohya_modules(sd)
    if fmt == "comfyui":
        loras, unused = from_comfyui(sd)
    elif fmt in ("diffusers", "peft"):
        loras, unused = diffusers_layout.from_diffusers(sd, meta)     # alpha per module from lora_adapter_metadata
    else:
        return {}, len(sd)
    return {k: (w.rank, w.alpha) for k, w in loras.items()}, len(unused)


def _kohya_modules(sd: dict) -> tuple[dict[str, tuple[int, float]], int]:
    """kohya names -> (rank, alpha); no (or 0) alpha means alpha = rank, as in formats.from_kohya."""
    out: dict[str, tuple[int, float]] = {}
    for key, value in sd.items():
        if key.endswith(_KOHYA_DOWN) and value.dim() >= 2:
            name = key[: -len(_KOHYA_DOWN)]
            alpha = sd.get(name + ".alpha")
            alpha = formats.scalar(alpha) if alpha is not None else None
            out[name] = (int(value.shape[0]), alpha or float(value.shape[0]))
    unused = sum(1 for k in sd if k.partition(".")[0] not in out)
    return out, unused


def describe(path: str | Path) -> dict:
    """Format, base family, module count per component, ranks, alphas, trigger and the metadata."""
    sd, meta = formats.read_lora_file(path)
    fmt = detect.detect_format(sd)
    family = detect.detect_family(sd, meta)
    mods, unused = _modules(sd, meta, fmt)
    ranks = Counter(r for r, _ in mods.values())
    alphas = Counter(a for _, a in mods.values())
    parts = Counter("text_encoder" if n.startswith(("lora_te", "text_encoder")) else "unet" for n in mods)
    trigger = meta.get("modelspec.trigger_phrase") or meta.get("ss_trigger", "")
    return {
        "file": str(path),
        "format": fmt,
        "base": "Unknown" if family == families.UNKNOWN else families.title(family),
        "modules": len(mods),
        "unet_modules": parts.get("unet", 0),
        "text_encoder_modules": parts.get("text_encoder", 0),
        "rank": _one_or_all(ranks),
        "alpha": _one_or_all(alphas),
        "unused_keys": unused,          # keys in no LoRA module (ComfyUI bias deltas, LoHa parts, ...)
        "trigger": trigger,
        "steps": meta.get("ss_steps", ""),
        "images": meta.get("ss_num_train_images", ""),
        "title": meta.get("modelspec.title") or meta.get("ss_output_name", ""),
        "date": meta.get("modelspec.date", ""),
        "metadata": {k: v for k, v in meta.items() if k not in ("sdlora_settings", "ss_tag_frequency")},
    }


def _one_or_all(counts: Counter):
    if len(counts) == 1:
        return next(iter(counts))
    return json.dumps({str(k): v for k, v in sorted(counts.items())})


__all__ = ["describe"]
