"""Aspect-ratio buckets: each image trains at the shape nearest its own, not cropped to a square.

A bucket is a (width, height) with about the training resolution's pixel area, both sides a multiple
of what the U-Net needs (its downsampling times the VAE's: 64 px for SD 1.x/2.x; 16 px for the small
test bases). Each image goes to the bucket nearest its aspect ratio, is resized to cover it and
centre-cropped by no more than the rounding to the bucket's sides. Batches are drawn from one bucket at a
time (sdlora.training.batches). kohya's sd-scripts (library/model_util.py, make_bucket_resolutions) and
OneTrainer bucket the same way; the numbers here are ours.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

MAX_BUCKET_ASPECT = 4.0     # longer side / shorter side of the widest bucket (the scan warns beyond it too)


@dataclass(frozen=True)
class Fit:
    """Where one image trains: its bucket, and the part of the (upright) original that is kept."""
    bucket: tuple[int, int]                 # (width, height) in px
    crop: tuple[int, int, int, int]         # (left, top, right, bottom) in the original's px


def bucket_sizes(resolution: int, multiple: int, max_aspect: float = MAX_BUCKET_ASPECT) -> list[tuple[int, int]]:
    """Every (width, height), sides multiples of `multiple`, with at most resolution^2 px and each side as
    long as the area allows (the largest of its shape), from the tallest to the widest."""
    area, out = resolution * resolution, set()
    side = multiple
    while side <= resolution * max_aspect:
        other = area // side // multiple * multiple
        if other >= multiple and max(side, other) / min(side, other) <= max_aspect:
            out |= {(side, other), (other, side)}
        side += multiple
    return sorted(out, key=lambda b: b[0] / b[1])


def cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((width, height) to resize an image of `size` to, (left, top) of the bucket-sized crop in it): the
    smallest resize that covers the bucket, then a centred crop (the rule images.fit_bucket applies)."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    return (nw, nh), ((nw - bw) // 2, (nh - bh) // 2)


def fit(size: tuple[int, int], buckets: list[tuple[int, int]]) -> Fit:
    """The bucket nearest `size`'s aspect ratio (on a log scale; of two equally near, the larger), and the
    crop that fitting it keeps, in the original's pixels."""
    w, h = size
    aspect = math.log(w / h)
    bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))
    (nw, nh), (left, top) = cover(size, bucket)
    sx, sy = w / nw, h / nh
    return Fit(bucket, (round(left * sx), round(top * sy), round((left + bucket[0]) * sx),
                        round((top + bucket[1]) * sy)))


def square(size: tuple[int, int], resolution: int) -> Fit:
    """The fit without buckets: a centred square crop (--no-buckets)."""
    return fit(size, [(resolution, resolution)])


def assign(sizes: list[tuple[int, int]], resolution: int, multiple: int, enabled: bool = True) -> list[Fit]:
    """Each image's Fit: its bucket when buckets are `enabled`, else the square crop. The one rule the trainer
    (training.plan) and the web UI's image cards both follow."""
    if not enabled:
        return [square(size, resolution) for size in sizes]
    options = bucket_sizes(resolution, multiple)
    return [fit(size, options) for size in sizes]


def summary(fits: list[Fit]) -> str:
    """'64x64: 3 images, 48x80: 2 images' (tallest first)."""
    counts = Counter(f.bucket for f in fits)
    return ", ".join(f"{w}x{h}: {n} image{'s' * (n != 1)}"
                     for (w, h), n in sorted(counts.items(), key=lambda kv: kv[0][0] / kv[0][1]))


__all__ = ["Fit", "bucket_sizes", "cover", "fit", "square", "assign", "summary", "MAX_BUCKET_ASPECT"]
