"""Spec: a LoRA trained with the default settings learns a style, not content, and only with its trigger.

The fast subset of `bench/style_quality.py` (which prints the table for every dataset in datasets/): one
LoRA per style in FAST_STYLES is trained with every setting at its default on the built-in `tiny` base, then prompts that carry the trigger and colour-shape pairs the dataset never shows
are drawn at strengths 0, 0.5 and 1 with fixed seeds, and judged with the style's statistics
(sdlora.tinybase.stylestats) against the ceiling the base's VAE gives back:

- each statistic moves monotonically from the base's value (strength 0) toward the ceiling (a step back is
  read as the measurement's wobble when it is under 2% of that distance or within twice the standard error of
  the images' paired moves), and covers >= 70% of it at strength 1;
- the prompt's colour is still read back in >= 70% of the images at strength 1 (and, as a precondition,
  at 0: a base that cannot draw the colour fails there);
- without the trigger, strength 1 moves each statistic at most 1/3 as far as with it;
- `sdlora train --data datasets/<style>` with no other argument is the run a user makes: each style is
  trained that way (the dataset's sdlora.json trigger, every default) and judged as above, and the CLI's run
  resolves the same settings as the API's given none (what bench/style_quality.py trains).

Figures go to stdout and test-artifacts/style_quality_<style>_sdlora.png.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import style_quality as sq  # noqa: E402
from sdlora import LoraSpec, TrainConfig, default_steps  # noqa: E402
from sdlora.bases.load import recommended_lora_lr, recommended_steps_per_image  # noqa: E402
from sdlora.config import default_rank  # noqa: E402
from sdlora.tinybase import scenes, stylestats  # noqa: E402

# One style: a default LoRA on `tiny` is 3,000 steps (its 300 per image), and with dusk as well the suite took 14
# min. Sage is the one whose prompts without the trigger once moved past the bar (0.41x); dusk and the rest are
# judged by bench/style_quality.py (README, Learning quality).
FAST_STYLES = ("sage",)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "sdlora" / "base_model" / "model_index.json").is_file(),
                       reason="built-in tiny base model not built (python -m sdlora.tinybase build)"),
]


@pytest.fixture(scope="module")
def generator():
    from sdlora import Generator
    return Generator("tiny")


def train_with_the_cli(style: str, folder: Path) -> tuple[str, float]:
    """`sdlora train --data datasets/<style>` run in `folder` (the CLI writes to ./outputs): (LoRA, seconds)."""
    from sdlora.cli import main
    out = io.StringIO()
    t0 = time.time()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.chdir(folder)
        assert main(["train", "--data", str(ROOT / "datasets" / style)]) == 0
    return str(folder / out.getvalue().strip().splitlines()[-1]), time.time() - t0


@pytest.fixture(scope="module", params=FAST_STYLES)
def row(request, generator, tmp_path_factory) -> sq.Row:
    lora, seconds = train_with_the_cli(request.param, tmp_path_factory.mktemp("style_runs"))
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


def test_styles_in_words_are_captions_the_base_trained_on():
    """bench/style_quality.py --words asks the base for neon and hatch in its own caption words: each prompt must be
    exactly the caption the base's training gave such a scene."""
    from dataclasses import replace
    scene = scenes.Scene(colour="red", shape="star", size="large", position="on the left", background="white")
    content = scene.caption(with_background=False)
    assert content == "a large red star on the left"
    assert sq.IN_WORDS["neon"](content) == replace(scene, look="outline", background="black").caption()
    assert sq.IN_WORDS["hatch"](content) == replace(scene, texture="striped").caption()
    assert sq.outlined("a small blue circle at the top") == "a small blue circle outline at the top"


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


def test_cli_trains_the_dataset_with_no_other_argument(row):
    """The row is `sdlora train --data datasets/<style>`'s LoRA: the dataset's trigger, the defaults' work and
    samples, and every setting as the API resolves a run given none (the benchmark's runs)."""
    folder = ROOT / "datasets" / row.style
    lora = Path(row.lora)
    assert lora.name == f"{sq.dataset_trigger(folder)}.safetensors"
    # the work the defaults ask for, counted (time is measured in bench/, not here): the base's 300 steps per image
    images = len(list(folder.glob("*.png")))
    per_image = recommended_steps_per_image(ROOT / "sdlora" / "base_model")
    assert per_image == 300
    config = json.loads((lora.parent / "config.json").read_text())
    logged = (lora.parent / "log.csv").read_text().splitlines()
    assert config["steps"] == default_steps(images, per_image) == len(logged) and int(logged[-1].split(",")[0]) == config["steps"]
    samples = sorted((lora.parent / "samples").glob("step-*.png"))
    # 5 times, with and without the trigger, and once before training (the base's own images to compare with)
    assert len(samples) == (5 + 1) * 2 * len(config["train"]["sample_seeds"])
    assert len(list((lora.parent / "samples").glob("grid-*.png"))) == 0    # grids are the web UI's, not the CLI's
    # every setting as a run with no settings resolves it (TrainConfig's and LoraSpec's defaults, the derived ones
    # worked out from the image count and the base), which is what the benchmark's API runs train with
    train, spec = json.loads(json.dumps(asdict(TrainConfig()))), json.loads(json.dumps(asdict(LoraSpec())))
    train.update(steps=default_steps(images, per_image), lr=recommended_lora_lr(ROOT / "sdlora" / "base_model"))
    spec.update(rank=default_rank(images), alpha=float(default_rank(images)))
    assert train["lr"] == 3e-3
    assert {k: v for k, v in config["train"].items() if k != "sample_every"} == \
        {k: v for k, v in train.items() if k != "sample_every"}
    assert config["lora"] == spec and config["data"]["trigger"] == sq.dataset_trigger(folder)
