"""Proof that a LoRA file works elsewhere: the per-tool key check against a real base.

``check_file`` replays A1111's, ComfyUI's and diffusers' key-mapping rules
(``sdlora.loras.tools``) against the modules of a loaded base, in both the
diffusers names and the original-SD names A1111 sees.
"""
from __future__ import annotations

from pathlib import Path

import torch

from sdlora.bases import families
from sdlora.loras import detect
from sdlora.loras import diffusers_layout
from sdlora.loras import layouts as formats
from sdlora.loras.naming import naming_for
from sdlora.loras.tools import compat_report, compat_report_sdxl, format_report
from sdlora.bases.ldm_unet import ldm_module_names
from sdlora.bases.load import Base


def base_module_sets(base: Base) -> dict:
    """The module names each tool can see in this base: diffusers paths and A1111's original-SD names (SDXL:
    the second text encoder's too, and each U-Net module's SGM name)."""
    names = base.module_names()
    if base.family == "sdxl":
        return {"unet_modules": names["unet"], "text_encoder_modules": names["text_encoder"],
                "text_encoder_2_modules": names["text_encoder_2"], "unet_names": naming_for(base).unet_names}
    ldm = set(ldm_module_names(sorted(names["unet"]), dict(base.unet.config)).values())
    return {"unet_modules": names["unet"], "text_encoder_modules": names["text_encoder"], "ldm_unet_modules": ldm}


def check_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str], base: Base,
                     module_sets: dict[str, set[str]] | None = None) -> dict:
    """{"format", "family", "base_family", "tools": compat_report, "ok"} for a LoRA state dict.

    `module_sets` (from `base_module_sets`) may be given when the base's modules carry adapters now."""
    module_sets = module_sets or base_module_sets(base)
    fmt = detect.detect_format(sd)
    family = detect.detect_family(sd, metadata)
    xl = base.family == "sdxl"
    if fmt != "kohya":
        names = {"unet": module_sets["unet_modules"], "text_encoder": module_sets["text_encoder_modules"]}
        if xl:
            names["text_encoder_2"] = module_sets["text_encoder_2_modules"]
        if fmt == "comfyui":
            from sdlora.loras.comfyui import from_comfyui
            loras, unused = from_comfyui(sd, names, dict(base.unet.config))
        else:
            loras, unused = diffusers_layout.from_diffusers(sd, metadata, module_names=names)
        if unused:
            raise formats.LoraFileError(f"keys that are not LoRA weights of this base: {unused[:5]}")
        sd = formats.to_kohya(loras, dtype=torch.float32, naming=naming_for(base))   # what A1111 / ComfyUI need
    tools = compat_report_sdxl(sd, **module_sets) if xl else compat_report(sd, **module_sets)
    sd_layout = is_sd_layout(base)
    judged = tools if sd_layout else {"diffusers": tools["diffusers"]}   # A1111/ComfyUI cannot load this base
    ok = all(not r["unmapped"] for r in judged.values()) and family in (families.UNKNOWN, base.family)
    report = {"format": fmt, "family": family, "base": base.name, "base_family": base.family, "tools": tools,
              "sd_layout": sd_layout, "ok": ok}
    if not sd_layout:
        report["base_note"] = (f"base '{base.name}' is not an SD checkpoint A1111 or ComfyUI can load (its U-Net is "
                               "laid out differently), so its LoRAs are for trying sdlora, and for diffusers with "
                               "this base. Train on an SD 1.x/2.x or SDXL checkpoint (--base) for a file every tool "
                               "uses")
    return report


def is_sd_layout(base: Base) -> bool:
    """Whether the base's U-Net is laid out as SD's checkpoints are (two layers per block, a family's
    cross-attention width): what A1111 and ComfyUI can load, and A1111's key rule assumes. The built-in `tiny`
    base and the small test bases are not."""
    cfg = base.unet.config
    return cfg.layers_per_block == 2 and families.by_context_dim(cfg.cross_attention_dim) != families.UNKNOWN


def check_file(path: str | Path, base: Base) -> dict:
    sd, metadata = formats.read_lora_file(path)
    report = check_state_dict(sd, metadata, base)
    report["file"] = str(path)
    return report


def format_check(report: dict) -> str:
    fam, base_fam = families.title(report["family"]), families.title(report["base_family"])
    lines = [f"{report.get('file', 'LoRA')}: {report['format']} format, for {fam}; "
             f"base '{report['base']}' is {base_fam}"]
    if report["family"] not in (families.UNKNOWN, report["base_family"]):
        lines.append(f"wrong base: the file is for {fam}, the base is {base_fam}")
    if report["format"] != "kohya":
        lines.append("(A1111 and ComfyUI need the kohya naming; checked as the kohya file sdlora would write)")
    if report.get("sd_layout", True):
        lines.append(format_report(report["tools"]))
        lines.append("all keys map" if report["ok"] else "NOT every key maps: those keys would do nothing in that tool")
    else:                   # A1111 cannot load such a base at all: counting its keys answers no one's question
        lines.append(format_report({t: r for t, r in report["tools"].items() if t != "a1111"}))
        lines.append(("diffusers maps every key. " if report["ok"] else "NOT every key maps in diffusers. ") +
                     report["base_note"])
    return "\n".join(lines)


__all__ = ["check_file", "check_state_dict", "format_check", "base_module_sets", "is_sd_layout"]
