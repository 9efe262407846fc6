"""Write a finished run's LoRA file with its metadata and A1111 sidecar files."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sdlora.loras import layouts as formats

from sdlora.loras import metadata
from sdlora.training import adapters as lora_mod
from sdlora.runs import write_json, write_png

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def export_run(t, run_dir: Path) -> Path:
    """Export the trained adapters of trainer ``t`` into ``run_dir``; returns the LoRA path."""
    spec, cfg, data = t.spec, t.cfg, t.data
    loras = lora_mod.extract(t.acc.unwrap_model(t.unet), "unet", spec)
    if spec.text_encoder:
        loras.update(lora_mod.extract(t.base.text_encoder, "text_encoder", spec))
    name = run_dir.name
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    alpha = spec.alpha * (spec.rank ** 0.5) if spec.use_rslora else spec.alpha
    header = metadata.build_metadata(
        loras=loras, trigger=data.trigger, steps=t.plan.steps, num_images=len(t.plan.items),
        resolution=t.plan.resolution, seed=cfg.seed, lr=cfg.lr, base_name=t.base.name, output_name=name,
        rank=spec.rank, alpha=alpha, text_encoder=spec.text_encoder, family=t.base.family,
        prediction_type=t.base.prediction_type, training_started_at=config.get("started_at", ""),
        tag_frequency=_tag_frequency(t.plan.captions.values()),
        extra={"sdlora_settings": json.dumps({k: config[k] for k in ("data", "lora", "train")}),
               "sdlora_versions": json.dumps(config["versions"])})
    dtype = DTYPES[cfg.save_dtype]
    if cfg.save_format == "kohya":
        sd = formats.to_kohya(loras, dtype=dtype)
    else:
        sd, extra_meta = formats.to_diffusers(loras, dtype=dtype)
        header.update(extra_meta)
    header = metadata.add_hashes(sd, header)
    path = run_dir / f"{name}.safetensors"
    formats.save_lora_file(path, sd, header)
    write_json(run_dir / f"{name}.json", metadata.sidecar_json(
        trigger=data.trigger, family=t.base.family,
        description=f"sdlora style LoRA, rank {spec.rank}, alpha {alpha:g}, {t.plan.steps} steps on "
                    f"{len(t.plan.items)} images, base {t.base.name}"))
    preview = _preview(t)
    if preview is not None:
        write_png(run_dir / f"{name}.preview.png", preview)
    _record_check(t, run_dir, sd, header)
    return path


def _record_check(t, run_dir: Path, sd: dict, metadata: dict) -> None:
    """Run the per-tool key check on the exported file and keep the result beside it."""
    from sdlora.loras.check import check_state_dict, format_check
    lora_mod.remove_adapters(t.acc.unwrap_model(t.unet))          # the check needs the base's own module names
    if t.spec.text_encoder:
        lora_mod.remove_adapters(t.base.text_encoder)
    report = check_state_dict(sd, metadata, t.base)
    write_json(run_dir / "compat.json", report)
    t.cb.on_message(format_check(report))


def _preview(t):
    """A sample at strength 1 with the trigger prompt (the same path as generation)."""
    from sdlora.config import GenerateConfig
    from sdlora.generate import make_pipeline, render
    unet = t.acc.unwrap_model(t.unet)
    unet.eval()
    pipe = make_pipeline(t.base)
    pipe.unet = unet
    return render(pipe, GenerateConfig(prompt=t.plan.items[0].caption, seed=t.cfg.sample_seeds[0]
                                       if t.cfg.sample_seeds else 0), t.plan.resolution)


def _tag_frequency(captions) -> dict:
    """kohya's ss_tag_frequency: {dataset: {tag: count}} with comma-separated tags."""
    counts: dict[str, int] = {}
    for c in captions:
        for tag in (s.strip() for s in c.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {"images": counts}


__all__ = ["export_run"]
