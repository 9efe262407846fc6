"""What a run will do, worked out before any model is loaded: the images, their captions, and the
settings derived from the data and the base.

``suggested`` is the one place the derived defaults come from (steps from the image count and the steps per
image the base recommends, rank, the learning rate the base recommends, the sample interval): the CLI and the web UI both call it, the web UI
to show the values when images are added, the trainer (through ``resolve``) to fill the settings left
at ``None``. ``plan`` checks every image first and reports each problem with its file.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sdlora.bases.load import (Base, Geometry, base_lora_lr, base_steps_per_image, load_tokenizer,
                               native_resolution)
from sdlora.config import (DEFAULT_LR, STEPS_PER_IMAGE, ConfigError, DataConfig, LoraSpec, TrainConfig,
                           default_rank, default_steps)
from sdlora.data import buckets
from sdlora.data import scan as dataset

SAMPLE_TIMES = 5        # sample images this many times per run unless sample_every says otherwise


@dataclass
class Plan:
    """What will be trained, shown before training starts."""
    items: list
    problems: list
    steps: int
    resolution: int
    captions: dict[str, str] = field(default_factory=dict)   # file name -> exact caption
    fits: list = field(default_factory=list)                 # per item: its buckets.Fit (bucket and crop)

    @property
    def buckets(self) -> str:
        """'48x80: 2 images, 64x64: 3 images'."""
        return buckets.summary(self.fits)

    def images(self) -> dict[str, dict]:
        """{file name: {"bucket": [width, height], "crop": [left, top, right, bottom]}} for the run's config."""
        return {it.path.name: {"bucket": list(f.bucket), "crop": list(f.crop)} for it, f in zip(self.items, self.fits)}


def suggested(num_images: int, base: str | Base = "tiny", steps: int | None = None) -> dict:
    """The derived settings for `num_images` usable images on `base` (a name, or a loaded Base):
    {"steps", "steps_source", "rank", "lr", "lr_source", "sample_every", "resolution"}; `steps` given keeps it and
    derives the rest from it. Nothing is loaded: a base's recommendations and size are read from its configs."""
    loaded = isinstance(base, Base)
    recommended = base.lora_lr if loaded else base_lora_lr(base)
    per_image = base.lora_steps_per_image if loaded else base_steps_per_image(base)
    steps_source = ("set" if steps else
                    f"{per_image} per image, recommended by the base" if per_image else
                    f"{STEPS_PER_IMAGE} per image, default for SD bases")
    steps = steps or default_steps(max(num_images, 1), per_image or STEPS_PER_IMAGE)
    return {"steps": steps, "steps_source": steps_source, "rank": default_rank(num_images),
            "lr": recommended or DEFAULT_LR,
            "lr_source": "recommended by the base" if recommended else "default for SD bases",
            "sample_every": max(1, steps // SAMPLE_TIMES),
            "resolution": base.resolution if loaded else native_resolution(base)}


def resolve(spec: LoraSpec, cfg: TrainConfig, num_images: int,
            base: str | Base) -> tuple[LoraSpec, TrainConfig, dict[str, str]]:
    """`spec` and `cfg` with every derived setting left at None filled from `suggested`, and where the learning
    rate and the steps came from ({"lr": "set" | "recommended by the base" | ..., "steps": ...}) for the run's
    report."""
    s = suggested(num_images, base, cfg.steps)
    if spec.rank is None:
        spec = replace(spec, rank=s["rank"])
    sources = {"lr": "set" if cfg.lr is not None else s["lr_source"], "steps": s["steps_source"]}
    cfg = replace(cfg, steps=s["steps"], lr=s["lr"] if cfg.lr is None else cfg.lr,
                  sample_every=s["sample_every"] if cfg.sample_every is None else cfg.sample_every)
    return spec, cfg, sources


def plan(data: DataConfig, cfg: TrainConfig, native: Geometry) -> Plan:
    """Scan the images at data.resolution (else the base's native size), give each its bucket (or the square
    crop) and derive the length; raises DatasetError if too few images are usable."""
    folder = Path(data.folder)
    if not data.folder or not folder.is_dir():
        raise ConfigError(f"data folder {data.folder!r} does not exist; pass a folder of images")
    res = data.resolution or native.resolution
    items, problems = dataset.scan_dataset(folder, data.trigger, data.template, res, tokenizer=load_tokenizer())
    dataset.require_trainable(items, problems, folder)
    steps = cfg.steps or default_steps(len(items))     # provisional: resolve() sets the base's recommendation
    fits = buckets.assign([it.size for it in items], res, native.multiple, data.buckets)
    return Plan(items, problems, steps, res, {it.path.name: it.caption for it in items}, fits)


__all__ = ["Plan", "plan", "suggested", "resolve", "SAMPLE_TIMES"]
