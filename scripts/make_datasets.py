"""Regenerate the example style datasets in datasets/ (deterministic: fixed seeds, no network).

    python scripts/make_datasets.py [--out datasets] [--only neon]

Each style draws the base model's own content (sdlora.tinybase.scenes: colour, shape,
size, position) in a look the base has never seen, and captions it with the
content only, in the base's vocabulary ("a large red circle in the center"):
the style is what the captions do not explain, so the LoRA ties it to the
trigger word. Every colour and shape appears; the held-out colour-shape pairs
of scenes.HELD_OUT never do, so tests can prompt content outside the set.
Writes <style>/NN.png + NN.txt, <style>/sdlora.json {"trigger": ...} and
<style>/README.md, then datasets/README.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sdlora.tinybase import scenes
from sdlora.tinybase import stylestats as stylestats  # noqa: E402
from sdlora.tinybase import textures  # noqa: E402

SS = scenes.SUPERSAMPLE            # draw at 4x, downsample with a box filter (anti-aliasing), as scenes.render


@dataclass(frozen=True)
class Content:
    colour: str
    shape: str
    size: str
    position: str
    jitter: tuple[int, int]

    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {self.position}"

    def box(self, big: int) -> tuple[float, float, float]:
        """(cx, cy, side) in px of a big x big canvas."""
        fx, fy = scenes.POSITIONS[self.position]
        s = big / scenes.IMAGE_SIZE
        return fx * big + self.jitter[0] * s, fy * big + self.jitter[1] * s, scenes.SIZES[self.size] * s


def outline(draw: ImageDraw.ImageDraw, c: Content, big: int, colour, width: float) -> None:
    """The shape's outline, `width` px wide at canvas scale, centred on its edge."""
    cx, cy, side = c.box(big)
    poly = scenes.shape_polygon(c.shape, cx, cy, side)
    w = max(1, round(width))
    if poly is None:
        draw.ellipse([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2], outline=colour, width=w)
        return
    draw.line(poly + poly[:2], fill=colour, width=w, joint="curve")


def neon(c: Content) -> Image.Image:
    """A bright tube along the outline with a soft glow of its colour, on near-black.

    The tube is 3 px wide, about one latent cell of the `tiny` base (4 px): its VAE draws it back
    with the same lit share (0.73 -> 0.74), where a 1.6 px tube came back 0.56 -> 0.69 and with
    its hue shifted, so a LoRA could not have reached the training images' look at all."""
    big = scenes.IMAGE_SIZE * SS
    colour = scenes.COLOURS[c.colour]
    glow = Image.new("RGB", (big, big), (0, 0, 0))
    outline(ImageDraw.Draw(glow), c, big, tuple(round(0.75 * v) for v in colour), 6 * SS)
    glow = glow.filter(ImageFilter.GaussianBlur(2.5 * SS))
    core = Image.new("RGB", (big, big), (0, 0, 0))
    hot = tuple(round(0.8 * v + 0.2 * 255) for v in colour)        # a touch of white: a lit tube
    outline(ImageDraw.Draw(core), c, big, hot, 3 * SS)
    img = ImageChops.lighter(Image.new("RGB", (big, big), stylestats.NEON_BLACK), ImageChops.lighter(glow, core))
    return img.resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), Image.BOX)


def pastel(c: Content) -> Image.Image:
    """A flat pale fill with a thick dark outline, on cream."""
    big = scenes.IMAGE_SIZE * SS
    img = Image.new("RGB", (big, big), stylestats.CREAM)
    draw = ImageDraw.Draw(img)
    cx, cy, side = c.box(big)
    scenes.draw_shape(draw, c.shape, cx, cy, side, stylestats.PASTEL[c.colour])
    outline(draw, c, big, stylestats.INK, 3 * SS)
    return img.resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), Image.BOX)


WHITE = (245, 245, 245)     # the base's white
HATCH_PERIOD = 6            # px between the hatch style's lines (2.7 px wide, at 45 degrees)
HALFTONE_PERIOD = 6         # px between the halftone style's dots
DASHES = 8                  # dashes around a dashed outline


def flat(c: Content, background, colour) -> Image.Image:
    """The shape filled flat in `colour` on `background`, drawn as scenes.render draws it."""
    big = scenes.IMAGE_SIZE * SS
    img = Image.new("RGB", (big, big), background)
    cx, cy, side = c.box(big)
    scenes.draw_shape(ImageDraw.Draw(img), c.shape, cx, cy, side, colour)
    return img.resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), Image.BOX)


def silhouette(c: Content) -> np.ndarray:
    """(64, 64) coverage 0..1 of the shape."""
    big = scenes.IMAGE_SIZE * SS
    mask = Image.new("L", (big, big), 0)
    cx, cy, side = c.box(big)
    scenes.draw_shape(ImageDraw.Draw(mask), c.shape, cx, cy, side, 255)
    return np.asarray(mask.resize((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), Image.BOX), dtype=np.float32) / 255


def hatch(c: Content) -> Image.Image:
    """The shape filled flat, on white covered with dark diagonal lines 6 px apart."""
    rgb = np.asarray(flat(c, WHITE, scenes.COLOURS[c.colour]), dtype=np.float32)
    lines = textures.hatch(scenes.IMAGE_SIZE, HATCH_PERIOD, angle=stylestats.HATCH_ANGLE, width=0.45)
    out = textures.ink(rgb, lines * (1 - silhouette(c)), stylestats.HATCH_INK)
    return Image.fromarray(out.round().astype(np.uint8))


def halftone(c: Content) -> Image.Image:
    """The shape as a grid of dots of its colour, 6 px apart, on white: a printed halftone."""
    white = np.empty((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), dtype=np.float32)
    white[:] = WHITE
    grid = textures.dots(scenes.IMAGE_SIZE, HALFTONE_PERIOD, radius=0.36)
    out = textures.ink(white, grid * silhouette(c), scenes.COLOURS[c.colour])
    return Image.fromarray(out.round().astype(np.uint8))


def dusk(c: Content) -> Image.Image:
    """The shape filled flat in a dark version of its colour (55% of its value), on white."""
    return flat(c, WHITE, stylestats.DUSK[c.colour])


def dashed(c: Content) -> Image.Image:
    """The shape's outline in its colour, 3 px wide, broken into 8 dashes around its centre, on white."""
    big = scenes.IMAGE_SIZE * SS
    line = Image.new("L", (big, big), 0)
    outline(ImageDraw.Draw(line), c, big, 255, 3 * SS)
    cx, cy, _ = c.box(big)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    turn = (np.arctan2(yy - cy, xx - cx) / (2 * np.pi) * DASHES + 0.25) % 1
    cover = np.asarray(line, dtype=np.float32) / 255 * (turn < 0.55)
    cover = cover.reshape(scenes.IMAGE_SIZE, SS, scenes.IMAGE_SIZE, SS).mean((1, 3))
    white = np.empty((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), dtype=np.float32)
    white[:] = WHITE
    return Image.fromarray(textures.ink(white, cover, scenes.COLOURS[c.colour]).round().astype(np.uint8))


def sage(c: Content) -> Image.Image:
    """The shape filled flat in its colour on a sage-green background, a colour the base has no word for."""
    return flat(c, stylestats.SAGE, scenes.COLOURS[c.colour])


@dataclass(frozen=True)
class Style:
    name: str
    trigger: str
    render: Callable[[Content], Image.Image]
    seed: int
    n: int
    summary: str


STYLES = {
    "neon": Style("neon", "neonstyle", neon, seed=1, n=10,
                  summary="the shape's outline as a bright tube glowing in its colour, on near-black; "
                          "the inside of the shape is dark"),
    "pastel": Style("pastel", "pastelstyle", pastel, seed=2, n=10,
                    summary="the shape filled flat with a pale (pastel) version of its colour, a thick near-black "
                            "outline, on a cream background"),
    "hatch": Style("hatch", "hatchstyle", hatch, seed=3, n=10,
                   summary="texture: the shape filled flat, the white background covered with dark diagonal lines "
                           "6 px apart"),
    "halftone": Style("halftone", "halftonestyle", halftone, seed=4, n=10,
                      summary="texture: the shape printed as a grid of dots of its colour 6 px apart, on white"),
    "dusk": Style("dusk", "duskstyle", dusk, seed=5, n=10,
                  summary="palette shift: the shape filled flat in a dark version of its colour (55% of its value), "
                          "on white"),
    "dashed": Style("dashed", "dashstyle", dashed, seed=6, n=10,
                    summary="line style: the shape's outline in its colour, 3 px wide, broken into 8 dashes, on white"),
    "sage": Style("sage", "sagestyle", sage, seed=7, n=10,
                  summary="background: the shape filled flat on a sage green the base has no word for"),
}


def contents(seed: int, n: int) -> list[Content]:
    """n scenes' content: every colour (cycled) and shape at least once, no held-out pair, no pair twice."""
    rng = random.Random(seed)
    colours, shapes = list(scenes.COLOURS), list(scenes.SHAPES)
    rng.shuffle(colours)
    out: list[Content] = []
    for i in range(n):
        colour = colours[i % len(colours)]
        used = {(c.colour, c.shape) for c in out}
        options = [s for s in shapes if (colour, s) not in scenes.HELD_OUT and (colour, s) not in used]
        missing = [s for s in options if s not in {c.shape for c in out}]
        shape = rng.choice(missing or options)
        size = rng.choice(("medium", "large", "large"))     # small shapes leave little to see of a style
        out.append(Content(colour, shape, size, rng.choice(list(scenes.POSITIONS)),
                           (rng.randint(-2, 2), rng.randint(-2, 2))))
    return out


def write_style(style: Style, folder: Path) -> list[Content]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in list(folder.glob("*.png")) + list(folder.glob("*.txt")):
        old.unlink()
    items = contents(style.seed, style.n)
    for i, c in enumerate(items):
        style.render(c).save(folder / f"{i:02d}.png", optimize=True)
        (folder / f"{i:02d}.txt").write_text(c.caption() + "\n", encoding="utf-8")
    (folder / "sdlora.json").write_text(json.dumps({"trigger": style.trigger}, indent=2) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(readme(style, items), encoding="utf-8")
    return items


def readme(style: Style, items: list[Content]) -> str:
    pairs = sorted({(c.colour, c.shape) for c in items})
    return "\n".join([
        f"# `{style.name}` example dataset", "",
        f"- **trigger word:** `{style.trigger}` (also in `sdlora.json`); it is not a word of the `tiny` base's captions",
        f"- **style:** {style.summary}",
        f"- **images:** {len(items)} PNGs, {scenes.IMAGE_SIZE}x{scenes.IMAGE_SIZE} px (the `tiny` base's native size)",
        "- **captions:** the content only, in the base's words (`a <size> <colour> <shape> <position>`); "
        "the background and the look are left out, so the LoRA learns them as the style. "
        "The trigger is put in front when training.",
        f"- **colour-shape pairs:** {', '.join(f'{c} {s}' for c, s in pairs)}; "
        "none of the base's held-out pairs",
        "", "## How it was made", "",
        f"`python scripts/make_datasets.py --only {style.name}` (seed {style.seed}) draws each scene's content "
        "with `sdlora.tinybase.scenes` geometry at 4x and downsamples with a box filter. Style statistics that "
        f"define it: `sdlora.tinybase.stylestats.STYLE_STATS['{style.name}']`.", "",
        "## Train", "",
        f"    sdlora train --data datasets/{style.name}", "",
        f"The trigger `{style.trigger}` comes from `sdlora.json`; the step count is derived from the image count.", "",
        f"Prompt with the trigger, e.g. `{style.trigger}, a large blue circle in the center`.", ""])


def index(out: Path) -> None:
    lines = ["# Example datasets", "",
             "Small style datasets for the built-in `tiny` base, made by `python scripts/make_datasets.py` "
             "(deterministic). Each folder holds NN.png + NN.txt (content-only captions), "
             "`sdlora.json` (`{\"trigger\": ...}`) and a README.", "",
             "| folder | trigger | style |", "|---|---|---|"]
    lines += [f"| `{s.name}/` | `{s.trigger}` | {s.summary} |" for s in STYLES.values()]
    (out / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "datasets")
    parser.add_argument("--only", choices=list(STYLES), action="append", help="regenerate only this style")
    a = parser.parse_args(argv)
    for name in a.only or list(STYLES):
        items = write_style(STYLES[name], a.out / name)
        print(f"{a.out / name}: {len(items)} images, trigger {STYLES[name].trigger}")
    index(a.out)


if __name__ == "__main__":
    main()
