"""Strength calibration: the LoRA strength whose samples come closest to the training images, made strength 1.

With trigger isolation, guidance's empty prompt is drawn as by the base, so classifier-free guidance
(uncond + g (cond - uncond)) multiplies what the LoRA changes in the triggered prompt, and by how much
depends on the style: a background colour the base has no word for overshoots at strength 1 (sage:
80% of the way at 0.5, past it and back to 46% at 1, on `tiny` at guidance 5), while a hollow fill or a
fine texture needs all of strength 1. So after training, the training captions are drawn at a few
strengths with the base's recommended sampling, and the strength whose samples' latent statistics
(the samples encoded by the VAE as the training images were; per channel: mean, spread, mean difference
of neighbouring latents) come clearly closest to their own training images' becomes the file's strength
1: the up weights are scaled by it. It only ever scales down, so a file never does more than what was
trained.
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
        return (f"strength calibration ({steps} steps, guidance {guidance:g}; distance of the samples' latent "
                f"statistics to the training images at each strength: {figures}): {what}")


def latent_stats(lat: torch.Tensor) -> torch.Tensor:
    """(n, 3 C) per image: each channel's mean, standard deviation and mean |difference| of neighbouring
    latents (across and down), of latents (n, C, h, w) of any size."""
    lat = lat.float()
    grain = (lat[..., 1:, :] - lat[..., :-1, :]).abs().mean((2, 3)) + (lat[..., 1:] - lat[..., :-1]).abs().mean((2, 3))
    return torch.cat([lat.mean((2, 3)), lat.std((2, 3)), grain], 1)


def distance(drawn: torch.Tensor, trained: torch.Tensor) -> float:
    """Mean squared difference of paired latent statistics (drawn[i] for training image i), each statistic in
    units of its spread over the training images (floored, so a statistic they all share still counts)."""
    spread = trained.std(0) if len(trained) > 1 else torch.zeros_like(trained[0])
    spread = spread.clamp_min(0.1 * float(trained.abs().mean()) + 1e-6)
    return float((((drawn - trained) / spread) ** 2).mean())


def calibrate(draw: Callable[[str, int, float], torch.Tensor], captions: list[str], latents: list[torch.Tensor],
              sampling: tuple[int, float], seed: int = 0) -> Calibration:
    """The closest of STRENGTHS. `draw(caption, seed, strength)` gives the (1, C, h, w) latents the pipeline
    samples (the sampled image encoded again, as the training images were); `latents[i]` is training image i's
    own (C, h, w), as trained. A lower strength is picked only when it is clearly closer than 1."""
    n = min(N_CAPTIONS, len(captions))
    trained = torch.cat([latent_stats(lat[None]) for lat in latents[:n]])
    distances = {}
    for s in STRENGTHS:
        drawn = torch.cat([latent_stats(draw(captions[i], seed + i, s)) for i in range(n)])
        distances[s] = distance(drawn, trained)
    best = min(STRENGTHS, key=lambda s: (distances[s], -s))
    if 1.0 in distances and distances[best] > CLEARLY_CLOSER * distances[1.0]:
        best = 1.0                                                   # not clearly closer: keep what was trained
    return Calibration(best, distances, sampling)


__all__ = ["Calibration", "calibrate", "latent_stats", "distance", "STRENGTHS", "N_CAPTIONS", "CLEARLY_CLOSER", "SAMPLING"]
