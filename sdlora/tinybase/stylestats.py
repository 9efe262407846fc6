"""Style statistics: numbers, measured on images, that define the example datasets' styles.

Each statistic maps one RGB image to a float; a style is "learned" when images
drawn with the LoRA move from the base's value toward the training images'
value. Pure numpy/PIL, so the web UI, the README figures and the tests share them.

- ``neon`` (outlines glowing in the shape's colour on black): ``fill_ratio``, the
  share of the shape's silhouette that is lit (about 1 for the base's filled
  shapes, 0.5-0.75 for an outline, by its width), and ``background_luminance``.
- ``pastel`` (pale flat fills, thick black outlines, cream background):
  ``outline_contrast``, how much darker the ring around the shape is than the
  background (about 0 for the base, about 0.8 for a black outline on cream), and
  ``pastel_distance``, how far the shape's pixels are from the pastel palette.

``colour_name`` reads the shape's colour by hue, so a pale red still reads as
red (``scenes.dominant_colour`` matches RGB to the saturated palette and would
call pale red "white" or mix it up with the background).

A statistic that counts (``dash_pieces``) also takes the colour its prompt asked
for and counts only pixels of that hue: a speck of a busy backdrop counts as one
piece, as much as the whole shape, where in a mean over pixels it weighs by its
area. ``stat_values`` passes the colours to the statistics that take them.
"""
from __future__ import annotations

import colorsys
import inspect
from typing import Callable

import numpy as np
from PIL import Image

from sdlora.tinybase.scenes import COLOURS, holes
from sdlora.tinybase.textures import line_contrast, texture_energy

# Pastel = the saturated colour mixed with white; 40% white keeps every colour's chroma
# (max - min channel) >= 84, above scenes.foreground_mask's threshold of 70.
PASTEL_WHITE = 0.4
PASTEL: dict[str, tuple[int, int, int]] = {
    name: tuple(round((1 - PASTEL_WHITE) * c + PASTEL_WHITE * 255) for c in rgb) for name, rgb in COLOURS.items()}
NEON_BLACK = (8, 8, 12)          # neon background
CREAM = (248, 240, 222)          # pastel background (chroma 26: never mistaken for the shape)
INK = (28, 24, 24)               # pastel outline
DUSK_DARK = 0.55                 # dusk: each colour at 55% of its value (dark jewel tones)
DUSK: dict[str, tuple[int, int, int]] = {name: tuple(round(DUSK_DARK * c) for c in rgb) for name, rgb in COLOURS.items()}
SAGE = (196, 212, 176)           # sage background (chroma 36: never read as a shape)
HATCH_INK = (70, 70, 78)         # hatch: the background's lines
HATCH_ANGLE = 45.0               # hatch: the lines' angle, as textures.hatch draws it
MIN_CHROMA = 60                  # px with max-min channel >= this are "the shape" (backgrounds are grey/cream)
RING = 3                         # px: width of the band just outside the shape read as its outline
MARGIN = 5                       # px: background pixels are at least this far from the shape


def _rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]


def luminance(rgb: np.ndarray) -> np.ndarray:
    """(H, W) relative luminance in 0..1 (Rec. 709 weights on sRGB values; no linearisation)."""
    return (rgb @ np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)) / 255.0


def shape_mask(rgb: np.ndarray, min_chroma: int = MIN_CHROMA) -> np.ndarray:
    """(H, W) bool: saturated pixels, i.e. the shape (every style's background is near-neutral)."""
    return (rgb.max(-1) - rgb.min(-1)) >= min_chroma


def dilate(mask: np.ndarray, px: int = 1) -> np.ndarray:
    """Grow a bool mask by px pixels (8-connected)."""
    out = mask.copy()
    for _ in range(px):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] \
            | p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
    return out


def erode(mask: np.ndarray, px: int = 1) -> np.ndarray:
    return ~dilate(~mask, px)


def silhouette(rgb: np.ndarray) -> np.ndarray:
    """The shape's whole area: its saturated pixels closed over 2 px gaps (dots, hatching), holes filled."""
    fg = erode(dilate(shape_mask(rgb), 2), 2)
    return fg | holes(fg)


def background_mask(fg: np.ndarray) -> np.ndarray:
    """The background of an image whose shape mask is `fg`: pixels at least MARGIN px from the shape, not inside it."""
    return ~dilate(fg, MARGIN) & ~holes(fg)


def components(mask: np.ndarray, min_px: int = 3) -> int:
    """Number of 8-connected regions of mask with at least min_px pixels."""
    seen = np.zeros_like(mask)
    count = 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, n = [(y, x)], 0
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            n += 1
            for ny in (cy - 1, cy, cy + 1):
                for nx in (cx - 1, cx, cx + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        count += n >= min_px
    return count


# ---- statistics: image -> float ------------------------------------------------------------

def fill_ratio(image) -> float:
    """Lit share of the shape's silhouette (shape + enclosed holes): ~1 filled, 0.5-0.75 outline; nan if no shape."""
    fg = shape_mask(_rgb(image))
    area = fg.sum() + holes(fg).sum()
    return float(fg.sum() / area) if fg.sum() >= 8 else float("nan")


def background_luminance(image) -> float:
    """Mean luminance 0..1 of the pixels at least MARGIN px from the shape (all pixels if there is no room)."""
    rgb = _rgb(image)
    bg = background_mask(shape_mask(rgb))
    lum = luminance(rgb)
    return float(lum[bg].mean() if bg.sum() >= 16 else lum.mean())


def outline_contrast(image) -> float:
    """Background luminance minus the luminance of the RING px just outside the shape (0..1; ~0 without outline)."""
    rgb = _rgb(image)
    fg = shape_mask(rgb)
    if fg.sum() < 8:
        return float("nan")
    near = dilate(fg, RING)
    ring = near & ~fg & ~holes(fg)
    bg = background_mask(fg)
    lum = luminance(rgb)
    if ring.sum() == 0 or bg.sum() < 16:
        return float("nan")
    return float(lum[bg].mean() - lum[ring].mean())


def background_texture(image) -> float:
    """texture_energy (r = 2 px) of the background: ~0 for a plain one, ~25 for dark 6 px hatching on white."""
    rgb = _rgb(image)
    return texture_energy(rgb, 2, background_mask(shape_mask(rgb)))


def hatch_lines(image) -> float:
    """How much more the background's luminance (0..255) changes across the hatch style's 45-degree lines than
    along them, 2 px each way: ~0 for a plain, noisy or checkered background (every direction alike), ~143
    for the training images' dark 6 px lines on white. Texture energy alone also counts a checkerboard."""
    rgb = _rgb(image)
    return line_contrast(rgb, HATCH_ANGLE, 2, background_mask(shape_mask(rgb)))


def fill_texture(image) -> float:
    """texture_energy (r = 2 px) inside the shape, 2 px in from its edge: ~0 filled flat, ~15 as 6 px halftone dots."""
    rgb = _rgb(image)
    inner = erode(silhouette(rgb), 2)
    return texture_energy(rgb, 2, inner)


def dash_pieces(image, colour: str | None = None) -> float:
    """Separate pieces the shape is drawn in (8-connected, >= 3 px): 1 for a filled shape or a solid line, 8 for
    the dashed style's outline. With `colour` (a name of scenes.COLOURS: the prompt's), only the saturated pixels
    whose hue is nearest that colour's count, so a backdrop's specks of other hues are not pieces of the shape."""
    rgb = _rgb(image)
    fg = shape_mask(rgb) if colour is None else colour_mask(rgb, colour)
    return float(components(fg)) if fg.sum() >= 8 else float("nan")


def background_distance(image, colour: tuple[int, int, int]) -> float:
    """RGB distance (0..1 of the cube's diagonal) from the background's mean colour to `colour`."""
    rgb = _rgb(image)
    bg = background_mask(shape_mask(rgb))
    mean = rgb[bg].mean(0) if bg.sum() >= 16 else rgb.reshape(-1, 3).mean(0)
    return float(np.sqrt(((mean - np.asarray(colour, dtype=np.float32)) ** 2).sum()) / (255 * np.sqrt(3)))


def sage_distance(image) -> float:
    return background_distance(image, SAGE)


def palette_distance(image, palette: dict[str, tuple[int, int, int]]) -> float:
    """Mean RGB distance (0..1 of the cube's diagonal) from the shape's pixels to the nearest palette colour."""
    rgb = _rgb(image)
    fg = shape_mask(rgb)
    if fg.sum() < 8:
        return float("nan")
    pix = rgb[fg]                                                        # (N, 3)
    pal = np.array(list(palette.values()), dtype=np.float32)            # (C, 3)
    d = np.sqrt(((pix[:, None, :] - pal[None]) ** 2).sum(-1)).min(1)    # (N,)
    return float(d.mean() / (255 * np.sqrt(3)))


def pastel_distance(image) -> float:
    """palette_distance to the pastel palette: ~0.3 for the base's saturated colours, ~0 for pastel."""
    return palette_distance(image, PASTEL)


def dusk_distance(image) -> float:
    """palette_distance to the dusk palette: ~0.15 for the base's colours, ~0 for dusk's dark tones."""
    return palette_distance(image, DUSK)


# ---- reading the content back ----------------------------------------------------------------

_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] for name, rgb in COLOURS.items()}
_NAMES = list(_HUES)
_REF_HUES = np.array([_HUES[n] for n in _NAMES], dtype=np.float32)      # (C,)


def nearest_colour(pix: np.ndarray) -> np.ndarray:
    """Index into scenes.COLOURS of the palette hue nearest each pixel's, for RGB pixels (..., 3) in 0..255."""
    pix = pix / 255.0
    mx, mn = pix.max(-1), pix.min(-1)
    r, g, b = pix[..., 0], pix[..., 1], pix[..., 2]
    d = np.maximum(mx - mn, 1e-6)
    hue = np.where(mx == r, ((g - b) / d) % 6, np.where(mx == g, (b - r) / d + 2, (r - g) / d + 4)) / 6  # 0..1
    gap = np.abs(hue[..., None] - _REF_HUES)
    return np.minimum(gap, 1 - gap).argmin(-1)                           # hue is circular


def colour_mask(rgb: np.ndarray, colour: str, min_chroma: int = MIN_CHROMA) -> np.ndarray:
    """shape_mask restricted to the pixels whose hue is nearest `colour`'s (a name of scenes.COLOURS)."""
    if colour not in _HUES:
        raise ValueError(f"colour={colour!r} is not a colour of the base; known: {', '.join(_NAMES)}")
    return shape_mask(rgb, min_chroma) & (nearest_colour(rgb) == _NAMES.index(colour))


def colour_name(image, min_chroma: int = MIN_CHROMA) -> str | None:
    """The palette colour whose hue most shape pixels have (pale or glowing versions count); None if no shape."""
    rgb = _rgb(image)
    fg = shape_mask(rgb, min_chroma)
    if fg.sum() < 4:
        return None
    return _NAMES[np.bincount(nearest_colour(rgb[fg]), minlength=len(_NAMES)).argmax()]


# ---- styles ------------------------------------------------------------------------------------

Statistic = Callable[[object], float]
STYLE_STATS: dict[str, dict[str, Statistic]] = {
    "neon": {"fill_ratio": fill_ratio, "background_luminance": background_luminance},
    "pastel": {"outline_contrast": outline_contrast, "pastel_distance": pastel_distance},
    "hatch": {"background_texture": background_texture, "hatch_lines": hatch_lines},
    "halftone": {"fill_texture": fill_texture},
    "dusk": {"dusk_distance": dusk_distance},
    "dashed": {"dash_pieces": dash_pieces},
    "sage": {"sage_distance": sage_distance},
}


def takes_colour(stat: Statistic) -> bool:
    """Whether a statistic reads the prompt's colour (a `colour` argument: dash_pieces)."""
    return "colour" in inspect.signature(stat).parameters


def stat_values(stat: Statistic, images, colours=None) -> np.ndarray:
    """A statistic of each image (nan where it is undefined). `colours`, one name per image (the prompt's colour),
    is passed to the statistics that take it."""
    if colours is not None and takes_colour(stat):
        if len(colours) != len(images):
            raise ValueError(f"{len(colours)} colours for {len(images)} images: give one per image")
        return np.array([stat(im, colour=c) for im, c in zip(images, colours)], dtype=np.float64)
    return np.array([stat(im) for im in images], dtype=np.float64)


def defined_mean(values: np.ndarray) -> float:
    """Mean of a statistic's values, skipping those where it is undefined (nan; nan if all are)."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def mean_stat(stat: Statistic, images, colours=None) -> float:
    """Mean of a statistic over images, skipping images where it is undefined (nan); `colours` as stat_values."""
    return defined_mean(stat_values(stat, images, colours))


def describe(style: str, images) -> dict[str, float]:
    """Every statistic of ``style`` averaged over ``images``: {name: value}."""
    if style not in STYLE_STATS:
        raise ValueError(f"style={style!r} has no statistics; known styles: {', '.join(STYLE_STATS)}")
    return {name: mean_stat(fn, images) for name, fn in STYLE_STATS[style].items()}


def covered(base: float, target: float, value: float) -> float:
    """Share of the way from the base's value to the target's that ``value`` has gone (1 = all the way)."""
    if target == base:
        raise ValueError(f"base and target are both {base}: the statistic does not tell the style apart")
    return (value - base) / (target - base)


__all__ = ["PASTEL", "NEON_BLACK", "CREAM", "INK", "DUSK", "SAGE", "HATCH_INK", "STYLE_STATS", "silhouette",
           "background_mask", "components", "background_texture", "fill_texture", "dash_pieces",
           "background_distance", "sage_distance", "dusk_distance", "luminance", "shape_mask", "fill_ratio",
           "background_luminance", "outline_contrast", "palette_distance", "pastel_distance", "colour_name",
           "colour_mask", "nearest_colour", "takes_colour", "stat_values",
           "mean_stat", "describe", "covered"]
