"""How a run's results read on the Train tab: the loss smoothed over the raw points, a time left that does
not jump, and per sample step one grid of base / with trigger / without trigger for each seed.

No Gradio here: the Train tab shows what these return, and tests check them directly.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from sdlora.runs import sample_of, write_png

SMOOTHING = 0.9          # exponential moving average of the loss: the weight of the past
ETA_SMOOTHING = 0.9      # ... of the step time
ETA_AFTER = 3            # steps timed before a time left is said (the first ones load and warm up)
MIN_CELL = 192           # px: small bases' samples are enlarged to at least this, pixel for pixel


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing): the first point is its own."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** i))
    return out


def loss_rows(losses: list[tuple[int, float]]) -> list[tuple[int, float, str]]:
    """(step, value, series) rows for the chart: every raw loss, and the smoothed curve over them."""
    finite = [(s, v) for s, v in losses if math.isfinite(v)]
    steps, values = [s for s, _ in finite], [v for _, v in finite]
    return [(s, v, "raw") for s, v in finite] + [(s, v, "smoothed") for s, v in zip(steps, smoothed(values))]


class TimeLeft:
    """Seconds left from a smoothed step time; None ("estimating") until ETA_AFTER steps have been timed."""

    def __init__(self):
        self.last: float | None = None
        self.rate: float | None = None
        self.timed = 0

    def step(self, elapsed: float, step: int, total: int) -> float | None:
        if self.last is not None and elapsed >= self.last:
            dt = elapsed - self.last
            self.rate = dt if self.rate is None else ETA_SMOOTHING * self.rate + (1 - ETA_SMOOTHING) * dt
            self.timed += 1
        self.last = elapsed
        if self.rate is None or self.timed < ETA_AFTER:
            return None
        return self.rate * max(0, total - step)


def column_title(index: int, default_prompts: bool) -> str:
    if default_prompts:
        return {0: "with trigger", 1: "without trigger"}.get(index, f"prompt {index + 1}")
    return f"prompt {index + 1}"


def sample_grid(step_paths: list[Path], base_paths: dict[int, Path], default_prompts: bool = True) -> Image.Image:
    """One image: a row per seed, columns base (step 0, first prompt) then each prompt at this step, titled."""
    by_seed: dict[int, dict[int, Path]] = {}
    for p in step_paths:
        found = sample_of(p)
        if found:
            by_seed.setdefault(found[0], {})[found[1]] = p
    seeds = sorted(by_seed)
    prompts = sorted({i for row in by_seed.values() for i in row})
    columns = (["base"] if base_paths else []) + [column_title(i, default_prompts) for i in prompts]
    first = Image.open(next(iter(by_seed[seeds[0]].values())))
    scale = max(1, math.ceil(MIN_CELL / max(first.size)))
    cw, ch = first.size[0] * scale, first.size[1] * scale
    head, left = 22, 64
    grid = Image.new("RGB", (left + cw * len(columns), head + ch * len(seeds)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns):
        draw.text((left + c * cw + 6, 5), title, fill=(30, 30, 30))
    for r, seed in enumerate(seeds):
        draw.text((6, head + r * ch + ch // 2 - 6), f"seed {seed}", fill=(30, 30, 30))
        cells = ([base_paths.get(seed)] if base_paths else []) + [by_seed[seed].get(i) for i in prompts]
        for c, path in enumerate(cells):
            if path is None or not Path(path).is_file():
                continue
            im = Image.open(path).convert("RGB")
            if im.size != (cw, ch):
                im = im.resize((cw, ch), Image.NEAREST if scale > 1 else Image.LANCZOS)
            grid.paste(im, (left + c * cw, head + r * ch))
    return grid


def write_grid(run_dir: Path, step: int, step_paths: list[Path], base_paths: dict[int, Path],
               default_prompts: bool = True) -> Path:
    """samples/grid-step-NNNNNN.png of `sample_grid`, written atomically; returns its path."""
    path = Path(run_dir) / "samples" / f"grid-step-{step:06d}.png"
    write_png(path, sample_grid(step_paths, base_paths, default_prompts))
    return path


def base_samples(run_dir: Path) -> dict[int, Path]:
    """{seed: the step-0 sample of the first prompt} of a run (what the base drew before training)."""
    out = {}
    for p in sorted((Path(run_dir) / "samples").glob("step-000000-seed*-0.png")):
        found = sample_of(p)
        if found:
            out[found[0]] = p
    return out


__all__ = ["smoothed", "loss_rows", "TimeLeft", "sample_grid", "write_grid", "base_samples", "column_title"]
