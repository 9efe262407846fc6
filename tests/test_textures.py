"""Textures and the example styles' statistics: each statistic tells its dataset apart from what the base draws."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdlora.tinybase import scenes, stylestats, textures

ROOT = Path(__file__).resolve().parent.parent


def base_like(background=(245, 245, 245), colour="red", look="filled") -> Image.Image:
    """A scene as the base draws it: a flat saturated shape on a plain background."""
    img = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(img)
    if look == "filled":
        scenes.draw_shape(draw, "square", 32, 32, 30, scenes.COLOURS[colour])
    else:
        scenes.draw_outline(draw, "square", 32, 32, 30, scenes.COLOURS[colour], 3)
    return img


def dataset(style: str) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((ROOT / "datasets" / style).glob("*.png"))]


@pytest.mark.parametrize("kind", textures.KINDS)
def test_patterns_cover_part_of_the_image_at_their_scale(kind):
    rng = random.Random(0)
    fine, coarse = textures.pattern(kind, 64, 3, rng), textures.pattern(kind, 64, 8, rng)
    for cover in (fine, coarse):
        assert cover.shape == (64, 64) and 0 <= cover.min() and cover.max() <= 1
        assert 0.15 < cover.mean() < 0.75, f"{kind} covers {cover.mean():.2f}"
    # a coarse pattern has more of its contrast at a wide radius than at a narrow one, relative to a fine one
    ratio = lambda c: textures.texture_energy(c[..., None].repeat(3, -1) * 255, 4) / \
        textures.texture_energy(c[..., None].repeat(3, -1) * 255, 1)  # noqa: E731
    assert ratio(coarse) > ratio(fine)


def test_hatch_lines_repeat_at_their_period():
    lines = textures.hatch(64, 6, angle=0.0)            # vertical lines, 6 px apart
    column = lines.mean(0)
    assert np.allclose(column[:-6], column[6:], atol=1e-6)
    assert abs(column[:6].mean() - 0.45) < 0.02


def test_texture_energy_is_zero_on_flat_colour_and_grows_with_contrast():
    flat = np.full((64, 64, 3), 200, dtype=np.float32)
    assert textures.texture_energy(flat, 2) == 0.0
    cover = textures.hatch(64, 6)
    weak = textures.ink(flat, cover, (150, 150, 150))
    strong = textures.ink(flat, cover, (20, 20, 20))
    assert 0 < textures.texture_energy(weak, 2) < textures.texture_energy(strong, 2)


def test_direction_loss_tells_lines_from_lines_the_other_way_where_texture_loss_cannot():
    from sdlora.tinybase.stages import direction_loss, texture_loss
    lines = lambda angle: torch.from_numpy(textures.hatch(64, 6, angle=angle)).expand(1, 3, 64, 64) * 2 - 1
    x, other = lines(45.0), lines(135.0)
    assert float(direction_loss(x, x)) == 0.0
    flat = torch.full_like(x, float(x.mean()))
    # lines the other way: as much texture, another direction
    assert float(texture_loss(other, x)) < 0.1 * float(texture_loss(flat, x))
    assert float(direction_loss(other, x)) > 0.5 * float(direction_loss(flat, x)) > 0
    assert float(direction_loss(torch.roll(x, 3, dims=-1), x)) < 0.2 * float(direction_loss(other, x))   # phase-free


def test_texture_loss_is_zero_for_the_same_image_and_not_for_a_flattened_one():
    from sdlora.tinybase.stages import texture_loss
    x = torch.from_numpy(textures.hatch(32, 6)).expand(1, 3, 32, 32) * 2 - 1
    flat = torch.full_like(x, float(x.mean()))
    assert float(texture_loss(x, x)) == 0.0
    assert float(texture_loss(flat, x)) > 0.1
    shifted = torch.roll(x, 3, dims=-1)                      # same texture, other phase: little loss
    assert float(texture_loss(shifted, x)) < 0.2 * float(texture_loss(flat, x))


def test_textured_scenes_say_their_texture_and_draw_it():
    rng = random.Random(1)
    scene = scenes.random_scene(rng, texture_p=1.0)
    assert scene.texture in scenes.TEXTURES and f"on a {scene.texture} " in scene.caption()
    plain = scenes.render(replace_texture(scene, ""))
    textured = scenes.render(scene)
    mask = stylestats.background_mask(stylestats.shape_mask(np.asarray(plain, dtype=np.float32)))
    assert textures.texture_energy(textured, 2, mask) > 3 * max(textures.texture_energy(plain, 2, mask), 0.5)
    assert scenes.measure(textured)[0] == scene.colour       # the shape is still read back


def replace_texture(scene, texture):
    from dataclasses import replace
    return replace(scene, texture=texture)


STYLE_VS_BASE = [
    # (style, statistic, what the base draws)
    ("hatch", "background_texture", base_like()),
    ("hatch", "hatch_lines", base_like()),
    ("halftone", "fill_texture", base_like()),
    ("dusk", "dusk_distance", base_like()),
    ("dashed", "dash_pieces", base_like(look="outline")),
    ("sage", "sage_distance", base_like()),
]


@pytest.mark.parametrize("style, name, base_image", STYLE_VS_BASE, ids=[f"{s}-{n}" for s, n, _ in STYLE_VS_BASE])
def test_each_statistic_tells_its_dataset_from_what_the_base_draws(style, name, base_image):
    stat = stylestats.STYLE_STATS[style][name]
    images = dataset(style)
    assert len(images) == 10
    values = np.array([stat(im) for im in images])
    base = stat(base_image)
    assert np.isfinite(values).all(), values
    gap = values.mean() - base
    # every training image is on the style's side of the base, by at least a quarter of the mean gap
    assert abs(gap) > 0 and (np.sign(gap) * (values - base) > 0.25 * abs(gap)).all(), (values, base)
    assert all(stylestats.colour_name(im) is not None for im in images)


def grey(lum: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(lum[..., None], 3, -1).clip(0, 255).astype(np.uint8))


def test_hatch_lines_counts_lines_in_the_hatch_direction_only():
    paper = np.full((64, 64, 3), 245.0, dtype=np.float32)
    lines = lambda angle: Image.fromarray(textures.ink(paper, textures.hatch(64, 6, angle=angle), stylestats.HATCH_INK)
                                          .round().astype(np.uint8))
    yy, xx = np.mgrid[0:64, 0:64]
    checker = grey(np.where((yy // 3 + xx // 3) % 2, 70.0, 245.0))
    noise = grey(np.random.default_rng(0).uniform(70, 245, (64, 64)))
    texture = stylestats.background_texture
    hatched = stylestats.hatch_lines(lines(stylestats.HATCH_ANGLE))
    assert hatched > 100
    assert np.mean([stylestats.hatch_lines(im) for im in dataset("hatch")]) > 100
    # a checkerboard or noise has as much texture energy as the lines, and no direction
    for other in (checker, noise):
        assert texture(other) > 0.5 * texture(lines(stylestats.HATCH_ANGLE))
        assert abs(stylestats.hatch_lines(other)) < 0.1 * hatched
    # lines the other way change along the hatch direction instead: below zero; a plain background: zero
    assert stylestats.hatch_lines(lines(stylestats.HATCH_ANGLE + 90)) < -0.5 * hatched
    assert stylestats.hatch_lines(base_like()) == 0


@pytest.mark.parametrize("angle", [0, 45, 90, 135])
def test_line_contrast_reads_lines_by_their_direction(angle):
    paper = np.full((64, 64, 3), 245.0, dtype=np.float32)
    lines = textures.ink(paper, textures.hatch(64, 6, angle=angle), stylestats.HATCH_INK)
    own = textures.line_contrast(lines, angle)
    assert own > 100
    assert textures.line_contrast(lines, angle + 90) == pytest.approx(-own)
    assert abs(textures.line_contrast(lines, angle + 45)) < 0.05 * own
    with pytest.raises(ValueError, match="angle=30"):
        textures.line_contrast(lines, 30)


def test_dataset_colours_read_back_as_captioned():
    for style in ("hatch", "halftone", "dusk", "dashed", "sage"):
        for png in sorted((ROOT / "datasets" / style).glob("*.png")):
            caption = png.with_suffix(".txt").read_text().split()
            colour = next(w for w in caption if w in scenes.COLOURS)
            assert stylestats.colour_name(Image.open(png)) == colour, (style, png.name)


def test_dash_pieces_counts_the_prompted_colour_only():
    """A filled red square on a backdrop with blue and green specks (as the base draws a background no prompt
    names): every saturated speck is a piece without the colour, none of them with it; the dashed dataset's
    outlines are 8 pieces either way."""
    image = base_like()
    draw = ImageDraw.Draw(image)
    for i, (x, y) in enumerate([(3, 3), (58, 4), (4, 57), (57, 58), (30, 2)]):
        draw.rectangle([x, y, x + 2, y + 2], fill=scenes.COLOURS[("blue", "green")[i % 2]])
    assert stylestats.dash_pieces(image) == 6
    assert stylestats.dash_pieces(image, colour="red") == 1
    assert np.isnan(stylestats.dash_pieces(image, colour="yellow"))       # no shape of that colour: undefined
    with pytest.raises(ValueError, match="colour='crimson'"):
        stylestats.dash_pieces(image, colour="crimson")
    for png in sorted((ROOT / "datasets" / "dashed").glob("*.png")):
        colour = next(w for w in png.with_suffix(".txt").read_text().split() if w in scenes.COLOURS)
        assert stylestats.dash_pieces(Image.open(png), colour=colour) == stylestats.dash_pieces(Image.open(png)) == 8


def test_stat_values_passes_colours_only_to_statistics_that_take_them():
    red, blue = base_like(colour="red"), base_like(colour="blue")
    assert stylestats.takes_colour(stylestats.dash_pieces) and not stylestats.takes_colour(stylestats.fill_ratio)
    pieces = stylestats.stat_values(stylestats.dash_pieces, [red, blue], ["red", "red"])
    assert pieces[0] == 1.0 and np.isnan(pieces[1])                    # the blue square has no red piece
    assert list(stylestats.stat_values(stylestats.fill_ratio, [red, blue], ["red", "red"])) == [1.0, 1.0]
    with pytest.raises(ValueError, match="1 colours for 2 images"):
        stylestats.stat_values(stylestats.dash_pieces, [red, blue], ["red"])
