"""Proof that files work elsewhere: the per-tool key check, and baking LoRAs into a checkpoint.

``check`` replays A1111's, ComfyUI's and diffusers' key-mapping rules (``compat``)
against the modules of a real base; ``merge`` writes a single-file checkpoint in
original-SD layout with LoRAs fused into it (``ldm``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import formats
from .compat import compat_report, format_report
from .ldm import save_single_file
from .ldm_unet import ldm_module_names
from .models import Base


def base_module_sets(base: Base) -> dict[str, set[str]]:
    """The module names each tool can see in this base: diffusers paths and A1111's original-SD names."""
    names = base.module_names()
    ldm = set(ldm_module_names(sorted(names["unet"]), dict(base.unet.config)).values())
    return {"unet_modules": names["unet"], "text_encoder_modules": names["text_encoder"], "ldm_unet_modules": ldm}


def check_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str], base: Base) -> dict:
    """{"format", "family", "base_family", "tools": compat_report, "ok"} for a LoRA state dict."""
    fmt = formats.detect_format(sd)
    family = formats.detect_family(sd, metadata)
    if fmt != "kohya":
        loras, unused = formats.from_diffusers(sd, metadata, module_names=base.module_names())
        if unused:
            raise formats.LoraFileError(f"keys that are not LoRA weights of this base: {unused[:5]}")
        sd = formats.to_kohya(loras, dtype=torch.float32)       # what A1111 / ComfyUI would need
    tools = compat_report(sd, **base_module_sets(base))
    ok = all(not r["unmapped"] for r in tools.values()) and family in ("unknown", base.family)
    return {"format": fmt, "family": family, "base": base.name, "base_family": base.family, "tools": tools, "ok": ok}


def check_file(path: str | Path, base: Base) -> dict:
    sd, metadata = formats.read_lora_file(path)
    report = check_state_dict(sd, metadata, base)
    report["file"] = str(path)
    return report


def format_check(report: dict) -> str:
    fam = formats.FAMILY_NAMES
    lines = [f"{report.get('file', 'LoRA')}: {report['format']} format, for {fam.get(report['family'], 'an unknown base')}"
             f"; base '{report['base']}' is {fam.get(report['base_family'], report['base_family'])}"]
    if report["family"] not in ("unknown", report["base_family"]):
        lines.append(f"wrong base: the file is for {fam[report['family']]}, the base is {fam[report['base_family']]}")
    if report["format"] != "kohya":
        lines.append("(A1111 and ComfyUI need the kohya naming; checked as the kohya file sdlora would write)")
    lines.append(format_report(report["tools"]))
    lines.append("all keys map" if report["ok"] else "NOT every key maps: those keys would do nothing in that tool")
    return "\n".join(lines)


def merge(generator, out: str | Path, dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> Path:
    """Write the generator's base with its current LoRAs fused in, as an original-SD single file."""
    base = generator.base
    with generator.lock:
        generator.stack.set(generator.stack.applied, fused=True)
        return save_single_file(out, base.unet, base.vae, base.text_encoder, base.family, dtype=dtype,
                                metadata=metadata)


__all__ = ["check_file", "check_state_dict", "format_check", "merge", "base_module_sets"]
