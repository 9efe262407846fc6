"""What a LoRA file holds, in plain figures (``sdlora inspect``, the web UI's library)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from sdlora.bases import families
from sdlora.loras import layouts as formats


def _modules(sd: dict, fmt: str) -> dict[str, tuple[int, float | None]]:
    """module name -> (rank, alpha or None), from the file's own keys."""
    out: dict[str, tuple[int, float | None]] = {}
    down = ".lora_down.weight" if fmt == "kohya" else ".lora_A.weight"
    for key, value in sd.items():
        if key.endswith(down):
            name = key[: -len(down)]
            alpha = sd.get(name + ".alpha")
            out[name] = (int(value.shape[0]), None if alpha is None else float(alpha))
    return out


def describe(path: str | Path) -> dict:
    """Format, base family, module count per component, ranks, alphas, trigger and the metadata."""
    sd, meta = formats.read_lora_file(path)
    fmt = formats.detect_format(sd)
    family = formats.detect_family(sd, meta)
    mods = _modules(sd, fmt)
    ranks = Counter(r for r, _ in mods.values())
    alphas = Counter(a if a is not None else float(r) for r, a in mods.values())
    if fmt != "kohya" and meta.get("ss_network_alpha"):
        alphas = Counter({float(meta["ss_network_alpha"]): len(mods)})
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
