"""Strength calibration: the LoRA strength whose samples come closest to the training images, made strength 1.

With trigger isolation, guidance's empty prompt is drawn as by the base, so classifier-free guidance
(uncond + g (cond - uncond)) multiplies what the LoRA changes in the triggered prompt, and by how much
depends on the style: a background colour the base has no word for overshoots at strength 1 (sage:
80% of the way at 0.5, past it and back to 46% at 1, on `tiny` at guidance 5), while a hollow fill or a
fine texture needs all of strength 1. So after training, the training captions are drawn at a few
strengths with the base's recommended sampling, and the strength whose samples come clearly closest to
their own training images becomes the file's strength 1: the up weights are scaled by it. It only ever
scales down, so a file never does more than what was trained.

Closeness is measured in pixels, against the training images as the base's VAE gives them back (encoded
and decoded: what a LoRA on the U-Net can reach), on a few statistics of each image: each colour channel's
mean and spread, how colourful its pixels are (mean and spread of their chroma), and how much the
luminance changes between neighbouring pixels over 1, 2, 4, ... px up to a sixteenth of the image's side
(grain, dots and lines, coarser structure). On the example styles' LoRAs this picks the same strength
from one set of sampling seeds to the next far more often than the same kind of statistics of the
latents did (bench/calibration_measures.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

STRENGTHS = (0.5, 0.75, 1.0)    # candidates; 1 is what was trained
N_CAPTIONS = 8                   # training captions drawn per strength (one seed each)
CLEARLY_CLOSER = 0.8             # a lower strength wins only at this share of strength 1's distance or less
SAMPLING = (25, 7.5)             # (steps, guidance) for a base without a recommendation: generation's defaults


@dataclass
class Calibration:
    strength: float                          # the trained update is scaled by this in the file
    distances: dict[float, float]            # strength -> distance of its samples to the training images
    sampling: tuple[int, float]              # (steps, guidance) the samples were drawn with

    def describe(self) -> str:
        steps, guidance = self.sampling
        figures = ", ".join(f"{s:g}: {d:.2f}" for s, d in self.distances.items())
        what = ("kept as trained" if self.strength == 1 else
                f"the file's strength 1 is the trained update x {self.strength:g}")
        return (f"strength calibration ({steps} steps, guidance {guidance:g}; distance of the samples' colour and "
                f"texture statistics to the training images at each strength: {figures}): {what}")


COARSEST = 16                      # the coarsest texture scale is this fraction of the image's side (1/16)
LUMA = (0.2126, 0.7152, 0.0722)    # Rec. 709 weights


def texture_scales(side: int) -> tuple[int, ...]:
    """1, 2, 4, ... px up to side / COARSEST: from a pixel's grain to a sixteenth of the image (on `tiny`'s 64 px:
    1, 2 and 4; at 512 px: 1 to 32)."""
    scales = [1]
    while scales[-1] * 2 <= side // COARSEST:
        scales.append(scales[-1] * 2)
    return tuple(scales)


def image_stats(images: torch.Tensor, scales: tuple[int, ...] | None = None) -> torch.Tensor:
    """(n, 8 + len(scales)) per image of images (n, 3, H, W) in 0..1: each colour channel's mean and standard
    deviation, the mean and standard deviation of the pixels' chroma (their largest channel minus their
    smallest: how colourful), then the mean |difference| of neighbouring pixels' luminance (across plus down)
    with the image averaged over k x k px blocks, for each k in `scales` (default: texture_scales of the
    shorter side)."""
    x = images.float()
    scales = scales or texture_scales(min(x.shape[-2:]))
    chroma = x.amax(1) - x.amin(1)
    luma = (x * torch.tensor(LUMA, dtype=x.dtype, device=x.device)[:, None, None]).sum(1, keepdim=True)
    texture = []
    for k in scales:
        y = torch.nn.functional.avg_pool2d(luma, k) if k > 1 else luma
        texture.append((y[..., 1:, :] - y[..., :-1, :]).abs().mean((1, 2, 3)) +
                       (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3)))
    return torch.cat([x.mean((2, 3)), x.std((2, 3)), torch.stack([chroma.mean((1, 2)), chroma.std((1, 2))], 1),
                      torch.stack(texture, 1)], 1)


def distance(drawn: torch.Tensor, trained: torch.Tensor) -> float:
    """Mean squared difference of paired image statistics (drawn[i] for training image i), each statistic in
    units of its spread over the training images (floored, so a statistic they all share still counts)."""
    spread = trained.std(0) if len(trained) > 1 else torch.zeros_like(trained[0])
    spread = spread.clamp_min(0.1 * float(trained.abs().mean()) + 1e-6)
    return float((((drawn - trained) / spread) ** 2).mean())


def calibrate(draw: Callable[[list[tuple[str, int]], float], list[torch.Tensor]], captions: list[str],
              targets: list[torch.Tensor], sampling: tuple[int, float], seed: int = 0) -> Calibration:
    """The closest of STRENGTHS. `draw([(caption, seed), ...], strength)` gives each request's (1, 3, H, W) image in
    0..1 as the pipeline samples it (all of a strength at once, so the caller can batch them); `targets[i]` is
    training image i (3, H, W) in 0..1 as the base's VAE gives it back (encoded as trained, then decoded). A lower
    strength is picked only when it is clearly closer than 1."""
    n = min(N_CAPTIONS, len(captions))
    scales = texture_scales(min(min(t.shape[-2:]) for t in targets[:n]))     # the same for every image
    trained = torch.cat([image_stats(t[None], scales) for t in targets[:n]])
    requests = [(captions[i], seed + i) for i in range(n)]
    distances = {}
    for s in STRENGTHS:
        images = draw(requests, s)
        if len(images) != n:
            raise ValueError(f"calibration asked for {n} images at strength {s:g} and was given {len(images)}")
        drawn = torch.cat([image_stats(image, scales) for image in images])
        distances[s] = distance(drawn, trained)
    return Calibration(choose(distances), distances, sampling)


def choose(distances: dict[float, float]) -> float:
    """The strength of the smallest distance (of equal ones, the highest), but 1 unless it is clearly closer."""
    best = min(distances, key=lambda s: (distances[s], -s))
    if 1.0 in distances and distances[best] > CLEARLY_CLOSER * distances[1.0]:
        best = 1.0                                                   # not clearly closer: keep what was trained
    return best


__all__ = ["Calibration", "calibrate", "choose", "image_stats", "texture_scales", "distance", "STRENGTHS", "N_CAPTIONS",
           "CLEARLY_CLOSER", "SAMPLING"]
