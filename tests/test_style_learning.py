"""Spec: a LoRA trained with the default settings learns a style, not content, and only with its trigger.

The fast subset of `bench/style_quality.py` (which prints the table for every dataset in datasets/): one
LoRA per style in FAST_STYLES is trained through the public API with every setting at its default on the
built-in `tiny` base, then prompts that carry the trigger and colour-shape pairs the dataset never shows
are drawn at strengths 0, 0.5 and 1 with fixed seeds, and judged with the style's statistics
(sdlora.tinybase.stylestats) against the ceiling the base's VAE gives back:

- each statistic moves monotonically from the base's value (strength 0) toward the ceiling (a step back
  under 2% of that distance is read as the measurement's wobble), and covers >= 70% of it at strength 1;
- the prompt's colour is still read back in >= 70% of the images at strength 1 (and, as a precondition,
  at 0: a base that cannot draw the colour fails there);
- without the trigger, strength 1 moves each statistic at most 1/3 as far as with it;
- `sdlora train --data datasets/<style>` with no other argument gives the same LoRA (the dataset's
  sdlora.json trigger, every default).

Figures go to stdout and test-artifacts/style_quality_<style>_sdlora.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import style_quality as sq  # noqa: E402
from sdlora import default_steps  # noqa: E402
from sdlora.tinybase import scenes, stylestats  # noqa: E402

FAST_STYLES = ("dusk", "dashed")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "sdlora" / "base_model" / "model_index.json").is_file(),
                       reason="built-in tiny base model not built (python -m sdlora.tinybase build)"),
]


@pytest.fixture(scope="module")
def generator():
    from sdlora import Generator
    return Generator("tiny")


@pytest.fixture(scope="module", params=FAST_STYLES)
def row(request, generator, tmp_path_factory) -> sq.Row:
    lora, seconds, _ = sq.train_ours(request.param, "tiny", tmp_path_factory.mktemp("style_runs"), {}, {})
    result = sq.judge(generator, request.param, lora, "sdlora", seconds)
    print("\n" + sq.table([result]))
    return result


@pytest.mark.parametrize("style", list(stylestats.STYLE_STATS))
def test_trigger_is_not_a_word_of_the_base(style):
    from sdlora.bases.load import load_tokenizer
    tok = load_tokenizer()
    words = [*scenes.COLOURS, *scenes.SHAPES, *scenes.SIZES, *scenes.POSITIONS, *scenes.BACKGROUNDS, *scenes.TEXTURES,
             "a on background and outline"]
    vocab = {t for w in words for t in tok.tokenize(w)}
    trigger = sq.dataset_trigger(ROOT / "datasets" / style)
    assert not set(tok.tokenize(trigger)) & vocab, f"{trigger} shares tokens with the base's captions"


def test_base_draws_the_prompted_colour(row):
    """Precondition: at strength 0 the base draws the prompt's colour; if not, no LoRA can keep it."""
    assert row.colour_base >= sq.BARS["colour"], f"the base itself draws the prompt's colour in {row.colour_base:.0%}"


def test_style_moves_monotonically_toward_the_ceiling(row):
    for name, s in row.stats.items():
        assert s["monotone"], f"{row.style} {name} is not monotonic in strength: {s['way']}\n{sq.table([row])}"


def test_style_covers_most_of_the_way_to_the_ceiling(row):
    for name, s in row.stats.items():
        assert s["way"][-1] >= sq.BARS["way"], f"{row.style} {name}\n{sq.table([row])}"


def test_content_stays(row):
    assert row.colour_kept >= sq.BARS["colour"], sq.table([row])


def test_without_trigger_changes_much_less(row):
    for name, s in row.stats.items():
        assert s["untriggered"] <= sq.BARS["untriggered"], f"{row.style} {name}\n{sq.table([row])}"


def test_cli_trains_the_dataset_with_no_other_argument(row, tmp_path, monkeypatch, capsys):
    """`sdlora train --data datasets/<style>`: the dataset's trigger, every default, the same LoRA as the API."""
    if row.style != FAST_STYLES[0]:
        pytest.skip("checked on one style")
    from safetensors.torch import load_file

    from sdlora.cli import main
    monkeypatch.chdir(tmp_path)                       # the CLI writes to ./outputs
    folder = ROOT / "datasets" / row.style
    assert main(["train", "--data", str(folder)]) == 0
    lora = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert lora.name == f"{sq.dataset_trigger(folder)}.safetensors"
    ours, api = load_file(str(lora)), load_file(row.lora)
    assert ours.keys() == api.keys() and all((ours[k] == api[k]).all() for k in ours)
    # the work the defaults ask for, counted (time is measured in bench/, not here): 100 steps per image
    images = len(list(folder.glob("*.png")))
    config = json.loads((lora.parent / "config.json").read_text())
    logged = (lora.parent / "log.csv").read_text().splitlines()
    assert config["steps"] == default_steps(images) == len(logged) and int(logged[-1].split(",")[0]) == config["steps"]
    samples = sorted((lora.parent / "samples").glob("step-*.png"))
    # 5 times, with and without the trigger, and once before training (the base's own images to compare with)
    assert len(samples) == (5 + 1) * 2 * len(config["train"]["sample_seeds"])
    assert len(list((lora.parent / "samples").glob("grid-*.png"))) == 0    # grids are the web UI's, not the CLI's
