"""Procedural scenes: one coloured shape on a plain or two-tone neutral background.

The built-in `tiny` base model (sdlora/tinybase.py) is trained on these, the
quality test (tests/test_tinybase.py) judges its images with `measure`, and the
example-dataset script can draw from them. Everything here is deterministic
given a `random.Random`, and depends only on PIL and numpy.

A scene's caption reads "a small red circle on the left on a white background";
size and position words are sometimes left out so short prompts work too. A
shape is filled, or drawn as an outline in its colour ("a red circle outline"):
the base learns both looks, as SD knows line art, so a style can pick one.
Shape colours are saturated hues and backgrounds are greys, so the foreground is
simply "the saturated pixels" when an image is judged.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

from sdlora.tinybase import textures

IMAGE_SIZE = 64        # px; the VAE maps 64x64x3 to 16x16x4 latents
SUPERSAMPLE = 4        # draw at 4x and downsample, for anti-aliased edges

# Saturated hues about 60 degrees apart (RGB), so a small hue shift never turns one into another.
# Backgrounds are neutral, so none of these is one.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 25, 25),
    "yellow": (240, 215, 0),
    "green": (30, 170, 50),
    "cyan": (0, 200, 215),
    "blue": (30, 60, 225),
    "purple": (170, 40, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
    "cream": (240, 228, 200),     # tinted, chroma <= 42: still far from every shape colour (>= 70)
    "navy": (28, 34, 70),
}
# A background's texture word and its pattern (sdlora.tinybase.textures), drawn in a shade of the background.
TEXTURES: dict[str, str] = {"striped": "hatch", "dotted": "dots", "speckled": "grain"}
TEXTURE_SCALES = (3.0, 4.0, 6.0)          # px: a textured scene's period or grain size is one of these
# With BuildConfig.stripe_words a striped background's caption names its angle (0 vertical, as textures.hatch draws
# it) and its width before `striped`: "a wide diagonal striped white background".
STRIPE_ANGLES: dict[float, str] = dict(zip(textures.HATCH_ANGLES, ("vertical", "diagonal", "horizontal", "slanted")))
STRIPE_WIDTHS: dict[float, str] = dict(zip(TEXTURE_SCALES, ("fine ", "", "wide ")))
SHAPES = ("circle", "square", "triangle", "star")
SIZES: dict[str, int] = {"small": 16, "medium": 24, "large": 34}   # bounding-box side, px
POSITIONS: dict[str, tuple[float, float]] = {                       # centre as a fraction of the image
    "in the center": (0.5, 0.5),
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
}
# Colour-shape pairs never drawn in training; the quality test prompts these.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "star"), ("green", "triangle"), ("blue", "circle"),
    ("yellow", "square"), ("purple", "triangle"), ("cyan", "star"),
)
STAR_INNER = 0.4       # inner/outer radius of the 5-point star (bounding-box fill ~0.34)
# A shape's colour in a lighter or darker version, named before the colour ("a pale red circle"): the share of
# the way to white, or the share of its value taken away, each scene draws from these ranges. Both stop at 0.5,
# where green, the least saturated colour, keeps a chroma of 70: still read as the shape.
TINTS: dict[str, tuple[float, float]] = {"pale": (0.3, 0.5), "dark": (0.3, 0.5)}
BACKDROP_SPREAD = 20   # an unnamed backdrop: a grey of any value, each channel moved up to this far (chroma <= 40)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str               # "white", or "white and black" for two-tone
    split: str = "none"           # two-tone split: "none", "vertical" or "horizontal"
    jitter: tuple[int, int] = (0, 0)   # px offset of the shape centre
    look: str = "filled"          # "filled", or "outline" (a line in the shape's colour)
    line: float = 3.0             # px: the outline's width
    texture: str = ""             # "", or a TEXTURES word: the background is striped, dotted or speckled
    texture_scale: float = 4.0    # px: the texture's period or grain size
    texture_seed: int = 0
    texture_angle: float | None = None   # stripes: the angle their texture_seed draws them at, named in the
                                         # caption with their width (None: not named)
    texture_shade: float = 0.55   # the texture's ink: the background's colour x this on light parts, that far
                                  # from white on dark ones
    tint: str = ""                # "", or a TINTS word: the shape's colour made paler or darker by tint_amount
    tint_amount: float = 0.0
    backdrop: tuple[int, int, int] | None = None   # a background colour no word names: the caption leaves it out

    def shape_rgb(self) -> tuple[int, int, int]:
        """The shape's colour, tinted as the scene says."""
        rgb = COLOURS[self.colour]
        if self.tint == "pale":
            return tuple(round(c + self.tint_amount * (255 - c)) for c in rgb)
        if self.tint == "dark":
            return tuple(round(c * (1 - self.tint_amount)) for c in rgb)
        if self.tint:
            raise ValueError(f"tint={self.tint!r} is not known: use one of {', '.join(TINTS)}")
        return rgb

    def caption(self, with_size: bool = True, with_position: bool = True, with_background: bool = True,
                with_look: bool = True) -> str:
        size = f"{self.size} " if with_size else ""
        where = f" {self.position}" if with_position else ""
        textured = f"{self.texture} " if self.texture else ""
        if self.texture_angle is not None:
            textured = f"{STRIPE_WIDTHS[self.texture_scale]}{STRIPE_ANGLES[self.texture_angle]} " + textured
        back = f" on a {textured}{self.background} background" if with_background and self.backdrop is None else ""
        look = " outline" if with_look and self.look == "outline" else ""
        tint = f"{self.tint} " if self.tint else ""
        return f"a {size}{tint}{self.colour} {self.shape}{look}{where}{back}"


def shape_polygon(shape: str, cx: float, cy: float, side: float) -> list[tuple[float, float]] | None:
    """Outline of `shape` in a side x side box centred at (cx, cy); None for a circle."""
    h = side / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":                          # apex up, base = height = side
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "star":                              # 5 points, one up; fit the box vertically
        r_out = side / (1 + math.cos(math.pi / 5))
        top = cy - h
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else r_out * STAR_INNER
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), top + r_out + r * math.sin(a)))
        return pts
    if shape == "circle":
        return None
    raise ValueError(f"shape={shape!r} is not known: use one of {', '.join(SHAPES)}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, side)
    if poly is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def draw_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill,
                 width: int, inside: bool = True) -> None:
    """`shape`'s outline, `width` px wide, inside its side x side box (or centred on its edge)."""
    poly = shape_polygon(shape, cx, cy, side - width if inside else side)
    if poly is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], outline=fill, width=width)
    else:
        draw.line(poly + poly[:2], fill=fill, width=width, joint="curve")


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image of size x size px."""
    big = size * SUPERSAMPLE
    names = scene.background.split(" and ")
    img = Image.new("RGB", (big, big), scene.backdrop or BACKGROUNDS[names[0]])
    draw = ImageDraw.Draw(img)
    if scene.split == "vertical":
        draw.rectangle([big // 2, 0, big, big], fill=BACKGROUNDS[names[1]])
    elif scene.split == "horizontal":
        draw.rectangle([0, big // 2, big, big], fill=BACKGROUNDS[names[1]])
    if scene.texture:
        img = textured_background(img, scene, size)
        draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    s = SUPERSAMPLE * size / IMAGE_SIZE
    cx = fx * big + scene.jitter[0] * s
    cy = fy * big + scene.jitter[1] * s
    if scene.look == "outline":
        draw_outline(draw, scene.shape, cx, cy, SIZES[scene.size] * s, scene.shape_rgb(),
                     round(scene.line * SUPERSAMPLE * size / IMAGE_SIZE))
    else:
        draw_shape(draw, scene.shape, cx, cy, SIZES[scene.size] * s, scene.shape_rgb())
    return img.resize((size, size), Image.BOX)


def textured_background(img: Image.Image, scene: Scene, size: int) -> Image.Image:
    """The (supersampled) background with the scene's texture laid over it at `size` px, in a shade of each
    part's colour (darker on light backgrounds, lighter on dark ones)."""
    small = np.asarray(img.resize((size, size), Image.BOX), dtype=np.float32)
    cover = textures.pattern(TEXTURES[scene.texture], size, scene.texture_scale * size / IMAGE_SIZE,
                             random.Random(scene.texture_seed))
    light = small.mean(-1, keepdims=True) > 100
    k = scene.texture_shade
    shade = np.where(light, small * k, small + (1 - k) * (255 - small))
    out = small * (1 - cover[..., None]) + shade * cover[..., None]
    return Image.fromarray(out.round().astype(np.uint8)).resize(img.size, Image.BILINEAR)


def random_scene(rng: random.Random, allow_held_out: bool = False, outline_p: float = 0.0,
                 texture_p: float = 0.0, texture_shades: tuple[float, float] = (0.55, 0.55),
                 outline_widths: tuple[float, float] = (2.0, 4.0), tint_p: float = 0.0,
                 backdrop_p: float = 0.0, stripe_words: bool = False) -> Scene:
    """A random training scene; held-out colour-shape pairs are redrawn unless allowed. With
    probability `outline_p` the shape is an outline `outline_widths` px wide, with `texture_p` the background
    is textured, its ink's shade drawn from `texture_shades`, with `tint_p` the shape's colour is pale or dark
    (TINTS), and with `backdrop_p` the background is a muted colour of any hue that the caption does not name
    (no extra draws when the shares are 0, or the shades one value: the scenes are those of a build without
    them)."""
    while True:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if allow_held_out or (colour, shape) not in HELD_OUT:
            break
    bgs = list(BACKGROUNDS)
    if rng.random() < 0.3:
        first, second = rng.sample(bgs, 2)
        background, split = f"{first} and {second}", rng.choice(("vertical", "horizontal"))
    else:
        background, split = rng.choice(bgs), "none"
    scene = Scene(colour, shape, rng.choice(list(SIZES)), rng.choice(list(POSITIONS)),
                  background, split, (rng.randint(-3, 3), rng.randint(-3, 3)))
    if outline_p and rng.random() < outline_p:
        scene = replace(scene, look="outline", line=rng.uniform(*outline_widths))
    if texture_p and rng.random() < texture_p:
        scene = replace(scene, texture=rng.choice(list(TEXTURES)), texture_scale=rng.choice(TEXTURE_SCALES),
                        texture_seed=rng.getrandbits(31))
        if texture_shades[0] != texture_shades[1]:
            scene = replace(scene, texture_shade=rng.uniform(*texture_shades))
        if stripe_words and scene.texture == "striped":     # the angle its own seed draws: the same pictures
            scene = replace(scene, texture_angle=textures.hatch_angle(random.Random(scene.texture_seed)))
    if tint_p and rng.random() < tint_p:
        tint = rng.choice(list(TINTS))
        scene = replace(scene, tint=tint, tint_amount=rng.uniform(*TINTS[tint]))
    if backdrop_p and rng.random() < backdrop_p:
        grey = rng.randint(20, 240)
        scene = replace(scene, split="none", backdrop=tuple(
            min(255, max(0, grey + rng.randint(-BACKDROP_SPREAD, BACKDROP_SPREAD))) for _ in range(3)))
    return scene


def random_colour_image(rng: random.Random, size: int = IMAGE_SIZE, outline_p: float = 0.0) -> Image.Image:
    """A shape and background in arbitrary RGB colours (no caption): VAE training data that makes
    the autoencoder keep chroma, which the mostly-grey scenes alone let it drop. With probability
    `outline_p` the shape is an outline 2-5 px wide instead, so thin coloured lines keep their hue."""
    big = size * SUPERSAMPLE
    rgb = lambda: tuple(rng.randint(0, 255) for _ in range(3))  # noqa: E731
    img = Image.new("RGB", (big, big), rgb())
    draw = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        draw.rectangle([big // 2, 0, big, big] if rng.random() < 0.5 else [0, big // 2, big, big], fill=rgb())
    side = rng.uniform(0.2, 0.6) * big
    cx, cy = rng.uniform(side / 2, big - side / 2), rng.uniform(side / 2, big - side / 2)
    shape, colour = rng.choice(SHAPES), rgb()
    if rng.random() < outline_p:
        draw_outline(draw, shape, cx, cy, side, colour, round(rng.uniform(2, 5) * SUPERSAMPLE * size / IMAGE_SIZE),
                     inside=False)
    else:
        draw_shape(draw, shape, cx, cy, side, colour)
    return img.resize((size, size), Image.BOX)


def random_caption(scene: Scene, rng: random.Random) -> str:
    """The scene's caption, with size and position each left out 25% of the time."""
    return scene.caption(with_size=rng.random() > 0.25, with_position=rng.random() > 0.25)


# ---- judging generated images ------------------------------------------------

def foreground_mask(rgb: np.ndarray, min_chroma: int = 70) -> np.ndarray:
    """(H, W) bool: pixels saturated enough to be the shape (backgrounds are grey)."""
    rgb = rgb.astype(np.int16)
    return (rgb.max(-1) - rgb.min(-1)) >= min_chroma


def dominant_colour(rgb: np.ndarray, mask: np.ndarray) -> str | None:
    """Name of the palette colour nearest to most foreground pixels; None if no foreground."""
    if mask.sum() == 0:
        return None
    pix = rgb[mask].astype(np.float32)                                     # (N, 3)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)           # (C, 3)
    nearest = ((pix[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)   # (N,)
    return list(COLOURS)[np.bincount(nearest, minlength=len(COLOURS)).argmax()]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of mask (drops specks the sampler leaves)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_n, label = None, 0, 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        label += 1
        stack, n = [(y, x)], 0
        labels[y, x] = label
        while stack:
            cy, cx = stack.pop()
            n += 1
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if n > best_n:
            best, best_n = label, n
    return labels == best if best else mask


def holes(mask: np.ndarray) -> np.ndarray:
    """Pixels outside mask that the image border cannot reach without crossing it (4-connected)."""
    free = ~mask
    reach = np.zeros_like(mask)
    reach[0, :], reach[-1, :], reach[:, 0], reach[:, -1] = free[0, :], free[-1, :], free[:, 0], free[:, -1]
    while True:
        p = np.pad(reach, 1)
        grown = (reach | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]) & free
        if (grown == reach).all():
            return free & ~reach
        reach = grown


def shape_of(mask: np.ndarray) -> str | None:
    """Which shape the mask is: the template that best overlaps its silhouette (holes filled, so an
    outline counts as its shape) in its bounding box."""
    if mask.sum() < 12:
        return None
    mask = largest_component(mask)
    mask = mask | holes(mask)
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = mask[y0:y1, x0:x1]
    h, w = crop.shape
    best, best_iou = None, -1.0
    for shape in SHAPES:
        big = SUPERSAMPLE
        tmpl = Image.new("L", (w * big, h * big), 0)
        poly = shape_polygon(shape, w * big / 2, h * big / 2, 1.0)
        # stretch the unit template to the box: scale x by w, y by h
        if poly is None:
            ImageDraw.Draw(tmpl).ellipse([0, 0, w * big, h * big], fill=255)
        else:
            pts = [(w * big / 2 + (px - w * big / 2) * w * big, h * big / 2 + (py - h * big / 2) * h * big)
                   for px, py in poly]
            ImageDraw.Draw(tmpl).polygon(pts, fill=255)
        t = np.asarray(tmpl.resize((w, h), Image.BOX)) >= 128
        iou = (t & crop).sum() / max((t | crop).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def measure(image: Image.Image) -> tuple[str | None, str | None]:
    """(dominant foreground colour, shape) of a generated image."""
    rgb = np.asarray(image.convert("RGB"))
    mask = foreground_mask(rgb)
    return dominant_colour(rgb, mask), shape_of(mask)
