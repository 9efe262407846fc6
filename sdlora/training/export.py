"""Write a finished run's LoRA file with its metadata, A1111's sidecar files and the key check.

`export_lora` gets what it saves: the adapter weights (a canonical LoraSet), the base they were
trained on (its name, family and prediction type, and the module names each tool can see) and the
run folder, whose config.json holds every setting and caption. It never touches a model.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.bases.load import Base
from sdlora.config import file_alpha
from sdlora.loras import diffusers_layout, layouts, metadata
from sdlora.loras.check import check_state_dict, format_check
from sdlora.loras.naming import naming_for
from sdlora import runs

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# A1111, ComfyUI and kohya read the kohya naming only (ComfyUI maps just the 48 text-encoder modules of
# the diffusers layout, and applies them at twice the strength); diffusers reads both.
DIFFUSERS_LAYOUT_NOTE = ("diffusers layout: diffusers' load_lora_weights reads it; A1111 and kohya load none of "
                         "its keys and ComfyUI only its text-encoder modules (at twice the strength). "
                         "Train with --format kohya for a file that loads everywhere")


def export_lora(run_dir: Path, loras: layouts.LoraSet, base: Base, module_sets: dict[str, set[str]],
                preview=None, extra_meta: dict[str, str] | None = None) -> tuple[Path, dict]:
    """Write <run>/<run>.safetensors, <run>.json, <run>.preview.png and compat.json; returns the LoRA's path
    and the key-check report. `module_sets` are the base's module names as each tool sees them
    (sdlora.loras.check.base_module_sets, taken before adapters were added); `extra_meta` goes in the header."""
    run_dir, name = Path(run_dir), Path(run_dir).name
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    spec, cfg, data = config["lora"], config["train"], config["data"]
    adaptive = spec.get("adapter") == "adalora"          # modules have their own ranks and alphas
    alpha = None if adaptive else file_alpha(spec["alpha"], spec["rank"], spec["use_rslora"])
    header = metadata.build_metadata(
        loras=loras, trigger=data["trigger"], steps=config["steps"], num_images=len(config["captions"]),
        resolution=config["resolution"], seed=cfg["seed"], lr=cfg["lr"], base_name=base.name, output_name=name,
        rank=None if adaptive else spec["rank"], alpha=alpha, text_encoder=spec["text_encoder"], family=base.family,
        prediction_type=base.prediction_type, training_started_at=config.get("started_at", ""),
        text_encoder_lr=cfg["text_encoder_lr"], tag_frequency=_tag_frequency(config["captions"].values()),
        extra={"sdlora_settings": json.dumps(shareable_settings(config)),
               "sdlora_versions": json.dumps(config["versions"]), **(extra_meta or {})})
    dtype = DTYPES[cfg["save_dtype"]]
    if cfg["save_format"] == "kohya":
        sd = layouts.to_kohya(loras, dtype=dtype, naming=naming_for(base))
    else:
        sd, extra_meta = diffusers_layout.to_diffusers(loras, dtype=dtype)
        header.update(extra_meta)
    header = metadata.add_hashes(sd, header)
    path = runs.lora_path(run_dir)
    layouts.save_lora_file(path, sd, header)
    runs.write_json(runs.sidecar_json_path(path), metadata.sidecar_json(
        trigger=data["trigger"], family=base.family,
        description=f"sdlora style LoRA, {_shape(loras, spec, alpha)}, {config['steps']} steps on "
                    f"{len(config['captions'])} images, base {base.name}"))
    if preview is not None:
        runs.write_png(runs.preview_path(path), preview)
    report = check_state_dict(sd, header, base, module_sets)
    if cfg["save_format"] != "kohya":
        report["note"] = DIFFUSERS_LAYOUT_NOTE
    runs.write_json(runs.compat_path(run_dir), report)
    return path, report


def _shape(loras: layouts.LoraSet, spec: dict, alpha: float | None) -> str:
    if alpha is not None:
        return f"rank {spec['rank']}, alpha {alpha:g}"
    ranks = [w.rank for w in loras.values()]
    return (f"AdaLoRA ranks {min(ranks)}-{max(ranks)} (mean {sum(ranks) / len(ranks):.1f}, target {spec['rank']}) "
            f"over {len(ranks)} modules")


PATH_SETTINGS = {"data": ("folder", "class_folder"), "train": ("output_dir", "base", "vae")}


def shareable_settings(config: dict) -> dict:
    """The run's settings for a file people share: folders and checkpoint paths cut to their last part, so a
    LoRA never carries the trainer's home folder or user name."""
    out = {k: dict(config[k]) for k in ("data", "lora", "train")}
    for part, names in PATH_SETTINGS.items():
        for name in names:
            value = out[part].get(name)
            if isinstance(value, str) and ("/" in value or "\\" in value):
                out[part][name] = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return out


def describe_export(report: dict) -> str:
    """The lines the trainer prints after export: each tool's key count, and the layout's reach."""
    text = format_check(report)
    return text + (f"\nnote: {report['note']}" if report.get("note") else "")


def _tag_frequency(captions) -> dict:
    """kohya's ss_tag_frequency: {dataset: {tag: count}} with comma-separated tags."""
    counts: dict[str, int] = {}
    for c in captions:
        for tag in (s.strip() for s in c.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"images": counts}


__all__ = ["export_lora", "describe_export", "DIFFUSERS_LAYOUT_NOTE"]
