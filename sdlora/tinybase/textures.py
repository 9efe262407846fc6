"""Textures at a few scales: hatching, dots, grain and brush strokes, and how much of each an image has.

The built-in base's VAE is trained on them (so it can give them back), some of its scenes have a
textured background (so its U-Net has drawn them), and the example style datasets use them. Each
pattern is a coverage map in 0..1 of shape (H, W) at the image's own resolution, drawn at 4x and
box-filtered, so a 1 px line is anti-aliased as the scenes' shapes are. `texture_energy` is the
statistic that tells a texture apart, by scale: the mean absolute difference between an image's
luminance and its local mean over a (2r+1) px window.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SS = 4                               # supersampling factor, as scenes.SUPERSAMPLE
KINDS = ("hatch", "dots", "grain", "strokes")
HATCH_ANGLES = (0.0, 45.0, 90.0, 135.0)   # degrees: the angles `pattern` draws hatching at (0 vertical)
SCALES = (2, 3, 4, 6, 8)             # px: a pattern's period (hatch, dots), grain size or stroke width x 2


def _box(big: Image.Image, size: int) -> np.ndarray:
    return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def hatch(size: int, period: float, angle: float = 45.0, width: float = 0.45, phase: float = 0.0) -> np.ndarray:
    """Parallel lines `period` px apart at `angle` degrees, each `width` x period wide."""
    yy, xx = np.mgrid[0:size * SS, 0:size * SS].astype(np.float32) / SS
    a = math.radians(angle)
    u = (xx * math.cos(a) + yy * math.sin(a)) / period + phase
    big = ((u - np.floor(u)) < width).astype(np.float32)
    return big.reshape(size, SS, size, SS).mean((1, 3))


def dots(size: int, period: float, radius: float = 0.3, phase: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """A square grid of round dots `period` px apart, each of radius `radius` x period."""
    yy, xx = np.mgrid[0:size * SS, 0:size * SS].astype(np.float32) / SS
    fy = (yy / period + phase[0]) % 1 - 0.5
    fx = (xx / period + phase[1]) % 1 - 0.5
    big = (fx * fx + fy * fy < radius * radius).astype(np.float32)
    return big.reshape(size, SS, size, SS).mean((1, 3))


def grain(size: int, scale: float, rng: random.Random) -> np.ndarray:
    """Random speckle of blob size about `scale` px: blurred noise, thresholded to a ~35% coverage."""
    noise = np.random.default_rng(rng.getrandbits(32)).random((size * SS, size * SS)).astype(np.float32)
    img = Image.fromarray((noise * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(scale * SS / 3))
    field = np.asarray(img, dtype=np.float32)
    big = (field > np.quantile(field, 0.65)).astype(np.float32)
    return big.reshape(size, SS, size, SS).mean((1, 3))


def strokes(size: int, scale: float, rng: random.Random, density: float = 1.0) -> np.ndarray:
    """Short straight brush strokes, `scale` / 2 px wide and about 3 x scale long, in one loose direction."""
    big = Image.new("L", (size * SS, size * SS), 0)
    draw = ImageDraw.Draw(big)
    base = rng.uniform(0, math.pi)
    n = int(density * 1.2 * size * size / (scale * scale * 1.5))
    for _ in range(n):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        a = base + rng.gauss(0, 0.25)
        half = 1.5 * scale * rng.uniform(0.7, 1.3)
        dx, dy = half * math.cos(a), half * math.sin(a)
        draw.line([((x - dx) * SS, (y - dy) * SS), ((x + dx) * SS, (y + dy) * SS)], fill=255,
                  width=max(1, round(scale / 2 * SS)))
    return _box(big, size)


def hatch_angle(rng: random.Random) -> float:
    """The angle `pattern` draws hatching at with a fresh `rng` in this state (it draws the angle first)."""
    return rng.choice(HATCH_ANGLES)


def pattern(kind: str, size: int, scale: float, rng: random.Random) -> np.ndarray:
    """A coverage map (size, size) in 0..1 of `kind` at `scale` px, with a random angle or phase."""
    if kind == "hatch":
        return hatch(size, scale, angle=hatch_angle(rng), phase=rng.random())
    if kind == "dots":
        return dots(size, scale, phase=(rng.random(), rng.random()))
    if kind == "grain":
        return grain(size, scale, rng)
    if kind == "strokes":
        return strokes(size, scale, rng)
    raise ValueError(f"texture kind={kind!r} is not known: use one of {', '.join(KINDS)}")


def ink(rgb: np.ndarray, coverage: np.ndarray, colour: tuple[int, int, int], strength: float = 1.0) -> np.ndarray:
    """rgb (H, W, 3) float 0..255 with `colour` laid over it where coverage (H, W) says, times strength."""
    a = (coverage * strength)[..., None]
    return rgb * (1 - a) + np.asarray(colour, dtype=np.float32) * a


def random_texture_image(rng: random.Random, size: int = 64) -> Image.Image:
    """VAE training data: a background of any colour (half of them near-neutral, as paper or ink),
    a texture of a random kind and scale in another colour over all or half of it, and sometimes a
    plain or textured shape on top."""
    from sdlora.tinybase import scenes

    def colour(neutral: bool) -> tuple[int, int, int]:
        if neutral:
            v, tint = rng.randint(0, 255), [rng.randint(-25, 25) for _ in range(3)]
            return tuple(int(np.clip(v + t, 0, 255)) for t in tint)
        return tuple(rng.randint(0, 255) for _ in range(3))

    back = colour(rng.random() < 0.5)
    rgb = np.empty((size, size, 3), dtype=np.float32)
    rgb[:] = back
    cover = pattern(rng.choice(KINDS), size, rng.choice(SCALES) * rng.uniform(0.9, 1.1), rng)
    if rng.random() < 0.3:                                    # only one half textured
        half = np.zeros((size, size), dtype=np.float32)
        half[:, size // 2:] = 1
        cover = cover * (half if rng.random() < 0.5 else half.T)
    rgb = ink(rgb, cover, colour(rng.random() < 0.5), rng.uniform(0.35, 1.0))
    if rng.random() < 0.6:                                    # a shape on top, flat or textured
        mask = Image.new("L", (size * SS, size * SS), 0)
        side = rng.uniform(0.25, 0.6) * size * SS
        cx, cy = rng.uniform(side / 2, size * SS - side / 2), rng.uniform(side / 2, size * SS - side / 2)
        scenes.draw_shape(ImageDraw.Draw(mask), rng.choice(scenes.SHAPES), cx, cy, side, 255)
        m = _box(mask, size)
        fill = np.empty_like(rgb)
        fill[:] = colour(False)
        if rng.random() < 0.5:
            fill = ink(fill, pattern(rng.choice(KINDS), size, rng.choice(SCALES), rng), colour(rng.random() < 0.5))
        rgb = rgb * (1 - m[..., None]) + fill * m[..., None]
    return Image.fromarray(np.clip(rgb, 0, 255).round().astype(np.uint8))


def _luma(image) -> np.ndarray:
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)[..., :3]
    return rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32) / 255.0


def local_mean(x: np.ndarray, r: int) -> np.ndarray:
    """Mean over the (2r+1) x (2r+1) window around each pixel (edges repeated)."""
    p = np.pad(x.astype(np.float64), r, mode="edge")
    c = p.cumsum(0).cumsum(1)
    c = np.pad(c, ((1, 0), (1, 0)))
    k = 2 * r + 1
    h, w = x.shape
    return (c[k:k + h, k:k + w] - c[:h, k:k + w] - c[k:k + h, :w] + c[:h, :w]) / (k * k)


def texture_energy(image, r: int = 2, mask: np.ndarray | None = None) -> float:
    """Mean |luminance - its local mean over (2r+1) px|, x 100, over `mask` (all pixels if None): ~0 for
    flat colour, 10-40 for a strong texture of period up to ~2r+1 px."""
    lum = _luma(image)
    hp = np.abs(lum - local_mean(lum, r)) * 100
    if mask is not None:
        if mask.sum() < 16:
            return float("nan")
        return float(hp[mask].mean())
    return float(hp.mean())


def _shifted_change(lum: np.ndarray, mask: np.ndarray, dy: int, dx: int) -> tuple[float, int]:
    """(mean |lum(p) - lum(p + (dy, dx))| over the pixel pairs both in mask, how many pairs)."""
    h, w = lum.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    both = mask[ys, xs] & mask[yd, xd]
    n = int(both.sum())
    return (float(np.abs(lum[ys, xs] - lum[yd, xd])[both].mean()) if n else float("nan")), n


def line_contrast(image, angle: float, step: int = 2, mask: np.ndarray | None = None) -> float:
    """How much more luminance (0..255) changes across lines at `angle` degrees (as `hatch` draws them: 0
    vertical, 45 diagonal) than along them, `step` px on each axis the direction moves on, over `mask` (all
    pixels if None): the lines' contrast with their direction. ~0 for flat colour and for textures alike in
    every direction (noise, dots, a checkerboard); negative for lines the other way. `angle` a multiple of 45
    degrees; nan with fewer than 16 pixel pairs."""
    if angle % 45:
        raise ValueError(f"angle={angle}: line_contrast reads lines at multiples of 45 degrees")
    lum = _luma(image) * 255.0
    mask = np.ones(lum.shape, dtype=bool) if mask is None else mask
    a = math.radians(angle)
    sin, cos = (int(np.sign(round(v, 6))) for v in (math.sin(a), math.cos(a)))
    across, along = (step * sin, step * cos), (step * cos, -step * sin)   # (dy, dx): the lines' normal, their run
    (c_across, n), (c_along, m) = (_shifted_change(lum, mask, *d) for d in (across, along))
    return c_across - c_along if min(n, m) >= 16 else float("nan")


__all__ = ["KINDS", "SCALES", "HATCH_ANGLES", "hatch_angle", "hatch", "dots", "grain", "strokes", "pattern", "ink",
           "random_texture_image", "local_mean", "texture_energy", "line_contrast"]
