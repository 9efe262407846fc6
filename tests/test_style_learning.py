"""Spec: a LoRA trained with the default settings learns a style, not content.

One LoRA is trained on an example dataset (datasets/<style>) through the public
API with every setting at its default (cross-attention only, the derived step
count, the default learning rate) on the built-in `tiny` base. Prompts that
carry the trigger and colour-shape pairs the dataset never shows are drawn at
strengths 0, 0.25, 0.5, 0.75 and 1 with fixed seeds, and judged with the
style's statistics (sdlora.tinybase.stylestats):

- each statistic moves monotonically from the base's value (strength 0)
  toward the training images' value (a step back under 2% of that distance is
  read as the measurement's wobble), and covers >= 70% of that distance at 1;
- the prompt's colour is still the one read back >= 70% of the time at 1
  (and, as a precondition, at 0: a base that cannot draw the colour fails there);
- without the trigger, strength 1 moves each statistic much less (<= 1/3 as far);
- `sdlora train --data datasets/<style>` with no other argument gives the same
  LoRA (the dataset's sdlora.json trigger, every default) in a couple of minutes.

Figures go to stdout and test-artifacts/style_learning_<style>.json with a grid
image. `python tests/test_style_learning.py --style pastel --set lr=3e-4` prints
the same figures for other settings (how the defaults were judged).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlora import DataConfig, GenerateConfig, Generator, LoraChoice, LoraSpec, TrainConfig, default_steps, train

from sdlora.tinybase import scenes
from sdlora.tinybase import stylestats

ROOT = Path(__file__).resolve().parent.parent
STYLE = "neon"
STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SEEDS = (0, 1)
N_PROMPTS = 6
SAMPLING = {"steps": 20, "guidance": 5.0}    # the tiny base's recommended sampling (its build.json)
MIN_COVERED = 0.70                           # the spec's bar: share of base -> training distance at strength 1
MIN_COLOUR = 0.70                            # the spec's bar: prompt's colour read back at strength 1
MAX_UNTRIGGERED = 1 / 3                      # "much less": change without the trigger / change with it
MONOTONIC_SLACK = 0.02                       # a step back smaller than 2% of the distance is measurement wobble
ARTIFACTS = ROOT / "test-artifacts"

# What the figures are (neon, 1,000 steps, defaults, the built-in base of 2026-11-25, built with the word
# identity loss; identical with 1 and 2 threads): share of the base -> training distance covered at strength 1,
# fill ratio 75% and background luminance 95%; without the trigger they move 0.07x and 0.10x as far as with it;
# colour read back 83% at strength 1 (100% at 0). The curves' only steps back are 0.001 (fill ratio, 0 -> 0.25,
# at its ceiling of 1) and 0.005 (background, 0.75 -> 1, within 0.02 of the training value): 0.4% and 1.1% of
# the distance, under MONOTONIC_SLACK.
# How it got there. Offset noise in the base (SD's schedule leaves ~7% of the image at t=999, so without it the
# model reads brightness from the noise and a LoRA cannot make a dark image) and trigger isolation in the trainer
# (guidance otherwise subtracts the style from itself) gave the background. Outline scenes in the base (40%,
# `a red circle outline`) gave the fill ratio something to move to. The trigger's selectivity came from the
# text encoder: trained on denoising alone, it gave a word no caption uses nearly the state of any other (the
# trigger's distinct direction held 0.1% of its state's energy), so the LoRA restyled prompts without the
# trigger as much as with it (0.97-1.00x, also with its key/value A matrices started on that direction or held
# there). With the word-identity loss (tinybase identity_weight) that share is 8-17%.
# The previous base (no outlines, no identity loss): 87% / 6-11% covered, 0.97x without the trigger.
# Pastel on this base at defaults (reported, not tested): outline contrast 15%, palette distance 32%
# covered, 0.33x / 0.64x without the trigger, and the colour read back falls to 17% at strength 1 (the
# pale fills and thick outlines overwrite the content); on the previous base 22% / 32%.
# The same build with identity weight 0.1 instead of 1: fill 49% (not monotonic), background 93%, 0.00x / 0.49x.

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (ROOT / "sdlora" / "base_model" / "model_index.json").is_file(),
                       reason="built-in tiny base model not built (python -m sdlora.tinybase build)"),
]


# ---- the measurement (also used by the __main__ block) -----------------------------------------

def dataset_trigger(folder: Path) -> str:
    return json.loads((folder / "sdlora.json").read_text(encoding="utf-8"))["trigger"]


def dataset_pairs(folder: Path) -> set[tuple[str, str]]:
    """Colour-shape pairs the dataset's captions show ('a large red circle ...')."""
    pairs = set()
    for txt in folder.glob("*.txt"):
        words = txt.read_text(encoding="utf-8").split()
        colour = next(w for w in words if w in scenes.COLOURS)
        pairs.add((colour, next(w for w in words if w in scenes.SHAPES)))
    return pairs


def unseen_contents(folder: Path, n: int = N_PROMPTS) -> list[tuple[str, str]]:
    """(content prompt, colour) for n colour-shape pairs the dataset never shows, centred, large or medium."""
    seen, out = dataset_pairs(folder), []
    for i, colour in enumerate(scenes.COLOURS):
        shapes = scenes.SHAPES[i % 4:] + scenes.SHAPES[:i % 4]
        shape = next(s for s in shapes if (colour, s) not in seen)
        size = ("large", "medium")[i % 2]
        out.append((f"a {size} {colour} {shape} in the center", colour))
    return out[:n]


def load_images(folder: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


def draw(gen: Generator, lora: str, strength: float, prompts: list[str]) -> list[Image.Image]:
    """One image per (prompt, seed), the same seeds at every strength."""
    return [gen.generate(GenerateConfig(prompt=p, seed=s, **SAMPLING), [LoraChoice(lora, strength)])
            for p in prompts for s in SEEDS]


def measure_style_learning(style: str = STYLE, out_dir: Path | None = None, base: str = "tiny",
                           lora: dict | None = None, **train_overrides) -> dict:
    """Train on datasets/<style> (defaults unless overridden) and measure; returns the figures."""
    folder = ROOT / "datasets" / style
    trigger = dataset_trigger(folder)
    t0 = time.time()
    result = train(DataConfig(folder=str(folder), trigger=trigger), LoraSpec(**(lora or {})),
                   TrainConfig(base=base, output_dir=str(out_dir or ARTIFACTS / "runs"),
                               **{"sample_every": 0, **train_overrides}))
    train_s = time.time() - t0
    contents = unseen_contents(folder)
    colours = [c for _, c in contents for _ in SEEDS]
    gen = Generator(base)
    lora_path = str(result.lora_path)
    with_trigger = {s: draw(gen, lora_path, s, [f"{trigger}, {p}" for p, _ in contents]) for s in STRENGTHS}
    without = {s: draw(gen, lora_path, s, [p for p, _ in contents]) for s in (0.0, 1.0)}
    training = load_images(folder)
    figures = {"style": style, "trigger": trigger, "train_seconds": round(train_s, 1), "lora": lora_path,
               "steps": result.steps_done, "prompts": [f"{trigger}, {p}" for p, _ in contents],
               "seeds": list(SEEDS), "settings": {**train_overrides, **(lora or {})} or "defaults", "stats": {}}
    for name, stat in stylestats.STYLE_STATS[style].items():
        base_value, target = stylestats.mean_stat(stat, with_trigger[0.0]), stylestats.mean_stat(stat, training)
        curve = [stylestats.mean_stat(stat, with_trigger[s]) for s in STRENGTHS]
        plain = [stylestats.mean_stat(stat, without[s]) for s in (0.0, 1.0)]
        figures["stats"][name] = {
            "training": target, "by_strength": dict(zip(map(str, STRENGTHS), curve)),
            "covered": stylestats.covered(base_value, target, curve[-1]),
            "change_with_trigger": curve[-1] - curve[0], "change_without_trigger": plain[1] - plain[0],
            "untriggered_ratio": abs(plain[1] - plain[0]) / max(abs(curve[-1] - curve[0]), 1e-9)}
    figures["colour_acc"] = {str(s): float(np.mean([stylestats.colour_name(im) == c for im, c in
                                                    zip(with_trigger[s], colours)])) for s in STRENGTHS}
    figures["colour_acc_untriggered_1.0"] = float(np.mean([stylestats.colour_name(im) == c
                                                           for im, c in zip(without[1.0], colours)]))
    save_artifacts(figures, with_trigger, without, training)
    return figures


def save_artifacts(figures: dict, with_trigger: dict, without: dict, training: list) -> None:
    """JSON figures and a grid: one row per strength with the trigger, then without it at 0 and 1, then training."""
    ARTIFACTS.mkdir(exist_ok=True)
    name = f"style_learning_{figures['style']}"
    (ARTIFACTS / f"{name}.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    rows = list(with_trigger.values()) + list(without.values()) + [training]
    size = scenes.IMAGE_SIZE
    grid = Image.new("RGB", (size * max(map(len, rows)), size * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * size, r * size))
    grid.save(ARTIFACTS / f"{name}.png")


def report(figures: dict) -> str:
    lines = [f"style {figures['style']} (trigger {figures['trigger']}): {figures['steps']} steps in "
             f"{figures['train_seconds']:.0f}s, settings {figures['settings']}"]
    for name, f in figures["stats"].items():
        curve = " ".join(f"{v:.3f}" for v in f["by_strength"].values())
        lines.append(f"  {name}: strengths {STRENGTHS} -> {curve}; training {f['training']:.3f}; "
                     f"covered {f['covered']:.0%}; without trigger {f['change_without_trigger']:+.3f} vs "
                     f"with {f['change_with_trigger']:+.3f} (ratio {f['untriggered_ratio']:.2f})")
    acc = " ".join(f"{v:.0%}" for v in figures["colour_acc"].values())
    lines.append(f"  colour read back by strength: {acc}; without trigger at 1: "
                 f"{figures['colour_acc_untriggered_1.0']:.0%}")
    return "\n".join(lines)


# ---- the spec ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    figs = measure_style_learning(STYLE, tmp_path_factory.mktemp("style_runs"))
    print("\n" + report(figs))
    return figs


@pytest.mark.parametrize("style", list(stylestats.STYLE_STATS))
def test_trigger_is_not_a_word_of_the_base(style):
    from sdlora.bases.load import load_tokenizer
    tok = load_tokenizer()
    words = [*scenes.COLOURS, *scenes.SHAPES, *scenes.SIZES, *scenes.POSITIONS, *scenes.BACKGROUNDS, "a on background and"]
    vocab = {t for w in words for t in tok.tokenize(w)}
    trigger = dataset_trigger(ROOT / "datasets" / style)
    assert not set(tok.tokenize(trigger)) & vocab, f"{trigger} shares tokens with the base's captions"


def test_base_draws_the_prompted_colour(figures):
    """Precondition: at strength 0 the base draws the prompt's colour; if not, no LoRA can keep it."""
    assert figures["colour_acc"]["0.0"] >= MIN_COLOUR, "the base itself misses the colour\n" + report(figures)


def test_style_moves_monotonically_toward_training(figures):
    """Each step up in strength moves the statistic toward the training images' value, or back by less than
    MONOTONIC_SLACK of the base -> training distance (12 images per strength; near the ends of the curve
    the mean wobbles by about 1% of the distance)."""
    for name, f in figures["stats"].items():
        curve = list(f["by_strength"].values())
        distance = f["training"] - curve[0]
        steps = np.sign(distance) * np.diff(curve)
        assert (steps >= -MONOTONIC_SLACK * abs(distance)).all(), \
            f"{name} is not monotonic in strength: {curve}\n{report(figures)}"


def test_style_covers_most_of_the_distance(figures):
    for name, f in figures["stats"].items():
        assert f["covered"] >= MIN_COVERED, f"{name} covered {f['covered']:.0%}\n{report(figures)}"


def test_content_stays(figures):
    assert figures["colour_acc"]["1.0"] >= MIN_COLOUR, report(figures)


def test_without_trigger_changes_much_less(figures):
    for name, f in figures["stats"].items():
        assert f["untriggered_ratio"] <= MAX_UNTRIGGERED, f"{name}\n{report(figures)}"


def test_cli_trains_the_dataset_with_no_other_argument(figures, tmp_path, monkeypatch, capsys):
    """`sdlora train --data datasets/<style>`: the dataset's trigger, every default, the same LoRA as the API."""
    from safetensors.torch import load_file

    from sdlora.cli import main
    monkeypatch.chdir(tmp_path)                       # the CLI writes to ./outputs
    assert main(["train", "--data", str(ROOT / "datasets" / STYLE)]) == 0
    lora = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert lora.name == f"{figures['trigger']}.safetensors"
    ours, api = load_file(str(lora)), load_file(figures["lora"])
    assert ours.keys() == api.keys() and all((ours[k] == api[k]).all() for k in ours)
    # the work the defaults ask for, counted (time is measured in bench/, not here): 100 steps per image
    images = len(list((ROOT / "datasets" / STYLE).glob("*.png")))
    config = json.loads((lora.parent / "config.json").read_text())
    logged = (lora.parent / "log.csv").read_text().splitlines()
    assert config["steps"] == default_steps(images) == len(logged) and int(logged[-1].split(",")[0]) == config["steps"]
    samples = sorted((lora.parent / "samples").glob("step-*.png"))
    # 5 times, with and without the trigger, and once before training (the base's own images to compare with)
    assert len(samples) == (5 + 1) * 2 * len(config["train"]["sample_seeds"])
    assert len(list((lora.parent / "samples").glob("grid-*.png"))) == 0    # grids are the web UI's, not the CLI's


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Train on an example dataset and print the style figures.")
    parser.add_argument("--style", default=STYLE, choices=list(stylestats.STYLE_STATS))
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field to override, e.g. lr=3e-4, steps=2000, min_snr_gamma=5")
    parser.add_argument("--lora", action="append", default=[], metavar="FIELD=VALUE",
                        help="a LoraSpec field to override, e.g. rank=16, self_attention=true")
    a = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}
    lora = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.lora)}
    print(report(measure_style_learning(a.style, base=a.base, lora=lora, **overrides)))
