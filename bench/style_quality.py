"""Style quality: train a LoRA on each example style dataset and judge it with the style's own statistics.

For every dataset in datasets/ that sdlora.tinybase.stylestats knows, a LoRA is trained with sdlora's
defaults (or the settings given; strength calibration included, so a file's strength 1 may be a share of
what was trained: `--set calibrate_strength=false` draws the trained update as it is) for each training
seed (`--seeds`, default 0 1 2: one seed's figures can swing by tens of points, enough to flip a verdict),
then prompts with the trigger and colour-shape pairs the dataset never shows are drawn at strengths 0, 0.5
and 1, and the same prompts without the trigger at 0 and 1, with fixed sampling seeds. The table gives each
seed's row, then their mean (the verdict's), per statistic:

- **styled**: the statistic of the judged prompts' contents drawn in the style by the generator that drew
  the dataset (scripts/make_datasets.py, which draws each dataset image back pixel for pixel): what the style
  is for these very prompts, as a style's statistics depend on the content (a medium star's outline is most
  of the star, a large circle's is not).
- **ceiling**: the same images after a round trip through the base's VAE (encode, decode): what the base can
  give back of the style for these prompts, the most a LoRA on the U-Net can be asked for, so the share of the
  way is measured to it (over 100% is an overshoot).
- **way @0.5 / @1**: share of the way from the base's value (strength 0) to the ceiling (for the mean,
  of the seeds' mean curve; at 1 also the seeds' range). The ± after the way at 1 is its standard error
  over the images (each paired with its strength-0 image): what other sampling seeds could change.
- **monotone**: no step up in strength moves back from the ceiling by more than the measurement can tell:
  a step is backwards when its images move back by over 2% of the way and by over twice the standard
  error of their move (each image paired with the same prompt and seed at the lower strength).
- **untriggered**: how far prompts without the trigger move at strength 1, over how far prompts
  with it move (for the mean, the seeds' mean moves).
- **colour kept**: share of images at strength 1 whose shape is still the prompt's colour.
- **file scale**: the share of the trained update that strength calibration wrote into the file (1: all
  of it; for the mean, the seeds' mean): seeds that calibrate differently differ most.

`--words` also draws, with no LoRA, the same prompts with the style told in the base's own caption words
where it has them (neon: "<shape> outline ... on a black background"; hatch: "... on a striped white
background"): how far the base's U-Net goes when asked, for the styles a LoRA on its attention
cannot steer it far enough.
`--reference PATH` also trains each dataset with diffusers' DreamBooth LoRA example script
(examples/dreambooth/train_dreambooth_lora.py; not part of sdlora: give your copy's path) on the same
base, images, steps, rank, learning rate and resolution, with its one instance prompt
"an image in <trigger> style", and judges its LoRA the same way: both rows are printed.

    python bench/style_quality.py                          # every style, defaults (about 3 min per style on CPU)
    python bench/style_quality.py --styles neon hatch --set steps=600 --seeds 0   # a quick, one-seed look
    python bench/style_quality.py --reference ~/diffusers/examples/dreambooth/train_dreambooth_lora.py
    python bench/style_quality.py --styles neon pastel hatch halftone --json a.json   # two processes on two
    python bench/style_quality.py --styles dusk dashed sage --json b.json               # cores, then:
    python bench/style_quality.py --merge a.json b.json                                 # one table and verdict

A report written before the ceiling was the judged prompts drawn in the style (its statistics have a
"training" figure, not "styled") is judged again by --merge from the curves and paired moves it kept: the
figures a fresh run gives the same LoRAs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench import _common as C  # noqa: E402
from bench.whole_unet import LR as WHOLE_UNET_LR  # noqa: E402
from sdlora.tinybase import scenes, stylestats  # noqa: E402
from sdlora.tinybase.stages import vae_round_trip  # noqa: E402

STRENGTHS = (0.0, 0.5, 1.0)
REFERENCE, WHOLE_UNET = "reference", "whole U-Net"      # the trainers sdlora's rows are compared with
COMPARED = (REFERENCE, WHOLE_UNET)
SEEDS = (0, 1)                # sampling seeds of each prompt
TRAIN_SEEDS = (0, 1, 2)       # a LoRA per seed: one seed's figures swing by tens of points (neon's fill 57% / 46%)
N_PROMPTS = 6
SAMPLING = {"steps": 20, "guidance": 5.0}    # the tiny base's recommended sampling (its build.json)
MONOTONIC_SLACK = 0.02        # a step back under this share of the way is a wobble, however sure
MONOTONIC_NOISE = 2.0         # ... and so is one within this many standard errors of the images' paired move
DATASETS = ROOT / "datasets"
# the bars of the learning-quality issue: share of the way at 1, untriggered ratio, colour kept
BARS = {"way": 0.70, "untriggered": 1 / 3, "colour": 0.70}


def styles() -> list[str]:
    """Every dataset folder with statistics, in stylestats' order."""
    return [s for s in stylestats.STYLE_STATS if (DATASETS / s / "sdlora.json").is_file()]


def dataset_trigger(folder: Path) -> str:
    from sdlora.data.captions import folder_defaults
    return folder_defaults(folder)["trigger"]


def dataset_pairs(folder: Path) -> set[tuple[str, str]]:
    """Colour-shape pairs the dataset's captions show ('a large red circle ...')."""
    pairs = set()
    for txt in folder.glob("*.txt"):
        words = txt.read_text(encoding="utf-8").split()
        pairs.add((next(w for w in words if w in scenes.COLOURS), next(w for w in words if w in scenes.SHAPES)))
    return pairs


def unseen_contents(folder: Path, n: int = N_PROMPTS) -> list[tuple[str, str]]:
    """(content prompt, colour) for n colour-shape pairs the dataset never shows, centred, large or medium."""
    seen, out = dataset_pairs(folder), []
    for i, colour in enumerate(scenes.COLOURS):
        shapes = scenes.SHAPES[i % 4:] + scenes.SHAPES[:i % 4]
        shape = next(s for s in shapes if (colour, s) not in seen)
        out.append((f"a {('large', 'medium')[i % 2]} {colour} {shape} in the center", colour))
    return out[:n]


def styled_targets(style: str, contents: list[tuple[str, str]]) -> list[Image.Image]:
    """Each content prompt ('a large red circle in the center') drawn in `style` by the generator that drew the
    dataset, once per sampling seed (SEEDS), in the order judge() draws them: the style's own look for them."""
    from scripts import make_datasets
    out = []
    for prompt, colour in contents:
        size, rest = prompt.removeprefix("a ").split(" ", 1)
        shape, position = rest.removeprefix(f"{colour} ").split(" ", 1)
        if size not in scenes.SIZES or shape not in scenes.SHAPES or position not in scenes.POSITIONS:
            raise ValueError(f"{prompt!r} is not a content caption of the base ('a <size> {colour} <shape> <position>')")
        image = make_datasets.STYLES[style].render(make_datasets.Content(colour, shape, size, position, (0, 0)))
        out += [image.convert("RGB")] * len(SEEDS)
    return out


def judged_colours(style: str) -> list[str]:
    """The prompt's colour of each image judge() draws for a strength (and of styled_targets'), in their order."""
    return [colour for _, colour in unseen_contents(DATASETS / style) for _ in SEEDS]


def styled_and_ceiling(vae, style: str) -> tuple[list[Image.Image], list[Image.Image]]:
    """The judged prompts drawn in `style` (styled_targets) and their round trips through `vae` (the ceiling)."""
    styled = styled_targets(style, unseen_contents(DATASETS / style))
    return styled, vae_round_trip(vae, styled)


@dataclass
class Row:
    """One LoRA's figures on one style."""
    style: str
    trainer: str
    seconds: float
    stats: dict = field(default_factory=dict)       # name -> {styled, ceiling, base, curve, untriggered, ...}
    colour_kept: float = float("nan")
    colour_base: float = float("nan")                # the same at strength 0: the base's own
    lora: str = ""
    seed: int | None = None                          # the training seed; None: the mean over several
    scale: float | None = None                       # the file's strength scale from calibration (None: not written)
    seeds_passing: tuple[int, int] | None = None     # a mean's (seeds whose own row passes, seeds)

    def passes(self) -> bool:
        return all(s["way"][-1] >= BARS["way"] and s["monotone"] and s["untriggered"] <= BARS["untriggered"]
                   for s in self.stats.values()) and self.colour_kept >= BARS["colour"]


def judge(gen, style: str, lora: str, trainer: str, seconds: float, seed: int | None = None,
          unchanged: dict | None = None, scale: float = 1.0, drawn: dict | None = None) -> Row:
    """Draw the style's prompts with `lora` (trained with `seed`) and measure every statistic of the style.
    `unchanged`, kept by the caller across LoRAs of the same base, holds per style what no LoRA changes (the
    images at strength 0, the prompts drawn in the style and their VAE round trips), drawn once. `scale` judges the file
    as if its up weights were scaled by it (each strength drawn at strength x scale); `drawn`, kept by a caller that
    judges one file at several scales, holds the images per (prompt, strength x scale), so a strength two scales share
    (0.5 x 1 and 1 x 0.5) is drawn once."""
    from sdlora import GenerateConfig, LoraChoice
    folder = DATASETS / style
    trigger = dataset_trigger(folder)
    contents = unseen_contents(folder)

    cache = {} if drawn is None else drawn

    def draw(strength: float, prompts: list[str]) -> list[Image.Image]:
        """Each prompt at each of SEEDS, the ones not in the cache drawn in one batched call."""
        missing = [p for p in dict.fromkeys(prompts) if (lora, p, strength * scale) not in cache]
        if missing:
            images = gen.generate_many([GenerateConfig(prompt=p, seed=s, **SAMPLING) for p in missing for s in SEEDS],
                                       [LoraChoice(lora, strength * scale)])
            for i, p in enumerate(missing):
                cache[(lora, p, strength * scale)] = images[i * len(SEEDS):(i + 1) * len(SEEDS)]
        return [image for p in prompts for image in cache[(lora, p, strength * scale)]]

    triggered_prompts, plain_prompts = [f"{trigger}, {p}" for p, _ in contents], [p for p, _ in contents]
    unchanged = {} if unchanged is None else unchanged
    if style not in unchanged:                     # strength 0 draws the base, whichever the LoRA
        unchanged[style] = (draw(0.0, triggered_prompts), draw(0.0, plain_prompts),
                            *styled_and_ceiling(gen.base.vae, style))
    base_triggered, base_plain, styled, ceiling_images = unchanged[style]
    triggered = {0.0: base_triggered, **{s: draw(s, triggered_prompts) for s in STRENGTHS if s}}
    plain = {0.0: base_plain, 1.0: draw(1.0, plain_prompts)}
    written = strength_scale(lora)
    row = Row(style, trainer, seconds, lora=lora, seed=seed,
              scale=written if scale == 1 else scale * (1.0 if written is None else written))
    colours = judged_colours(style)
    for name, stat in stylestats.STYLE_STATS[style].items():
        values = [stylestats.stat_values(stat, triggered[s], colours) for s in STRENGTHS]     # each image's, paired
        row.stats[name] = figures(stylestats.mean_stat(stat, styled, colours),
                                  stylestats.mean_stat(stat, ceiling_images, colours),
                                  [stylestats.defined_mean(v) for v in values],
                                  [stylestats.mean_stat(stat, plain[s], colours) for s in (0.0, 1.0)],
                                  [paired_move(a, b) for a, b in zip(values, values[1:])],
                                  paired_move(values[0], values[-1]))
        row.stats[name]["values"] = [v.tolist() for v in values]
    row.colour_kept, row.colour_base = (float(np.mean([stylestats.colour_name(im) == c for im, c in
                                                       zip(triggered[s], colours)])) for s in (1.0, 0.0))
    save_grid(row, triggered, plain, styled, ceiling_images, "" if scale == 1 else f"_x{scale:g}")
    return row


def paired_move(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of b - a over the images where both are defined: each image at two strengths,
    the same prompt and sampling seed."""
    d = (b - a)[np.isfinite(a) & np.isfinite(b)]
    if len(d) == 0:
        return float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def figures(styled: float, ceiling: float, curve: list[float], untriggered: list[float],
            moves: list[tuple[float, float]] | None = None, total: tuple[float, float] | None = None) -> dict:
    """A statistic's figures from its value on the prompts drawn in the style and their VAE round trips (the ceiling),
    with the trigger at each of STRENGTHS (`curve`; the first is the base's) and without it at 0 and 1.
    `moves` gives each step up in strength as the images' paired move (mean, standard error) and `total` the
    move from the first strength to the last (without them: the curve's steps, known exactly): a step is
    backwards only when it goes back by more than MONOTONIC_SLACK of the way and MONOTONIC_NOISE standard
    errors. `step_back` is each step's move back in shares of the way (negative: forward) with its standard
    error; `way_se` the standard error of the way at the last strength."""
    base = curve[0]
    span = ceiling - base
    way = [(v - base) / span if span else float("nan") for v in curve]
    moves = moves or [(b - a, 0.0) for a, b in zip(curve, curve[1:])]
    total = total or (curve[-1] - curve[0], 0.0)
    step_back = [(-move / span, se / abs(span)) if span else (float("nan"), float("nan")) for move, se in moves]
    monotone = all(not (back > MONOTONIC_SLACK and back > MONOTONIC_NOISE * se) for back, se in step_back)
    return {"styled": styled, "ceiling": ceiling, "base": base, "curve": curve, "way": way,
            "monotone": bool(monotone), "step_back": step_back, "moves": [list(m) for m in moves],
            "way_se": total[1] / abs(span) if span else float("nan"), "total": list(total),
            "untriggered": abs(untriggered[1] - untriggered[0]) / max(abs(curve[-1] - curve[0]), 1e-9),
            "untriggered_curve": untriggered}


def strength_scale(lora: str) -> float | None:
    """The share of the trained update that strength calibration wrote into the file (its metadata), if any."""
    from safetensors import safe_open
    with safe_open(lora, "pt") as f:
        value = (f.metadata() or {}).get("sdlora_strength_scale")
    return float(value) if value is not None else None


def save_grid(row: Row, triggered: dict, plain: dict, styled: list, ceiling: list, suffix: str = "") -> None:
    """test-artifacts/style_quality_<style>_<trainer>[_seed<seed>]<suffix>.png: a row per strength with the
    trigger, then without it at 0 and 1, then the prompts drawn in the style and their VAE round trips (each
    column one prompt and sampling seed)."""
    out = ROOT / "test-artifacts"
    out.mkdir(exist_ok=True)
    rows = list(triggered.values()) + list(plain.values()) + [styled, ceiling]
    size = scenes.IMAGE_SIZE
    grid = Image.new("RGB", (size * max(map(len, rows)), size * len(rows)), (255, 255, 255))
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            grid.paste(im.resize((size, size)), (c * size, r * size))
    seed = "" if row.seed is None else f"_seed{row.seed}"
    grid.save(out / f"style_quality_{row.style}_{row.trainer.replace(' ', '-')}{seed}{suffix}.png")


def outlined(content: str) -> str:
    """'a large red circle in the center' -> 'a large red circle outline in the center' (the base's word for an
    outline follows the shape, as in its captions)."""
    words = content.split(" ")
    at = next(i for i, w in enumerate(words) if w in scenes.SHAPES) + 1
    return " ".join(words[:at] + ["outline"] + words[at:])


# A style told in the base's caption words (scenes.Scene.caption), where the base has words for it.
IN_WORDS = {"neon": lambda content: f"{outlined(content)} on a black background",
            "hatch": lambda content: f"{content} on a striped white background"}


def in_words(gen, style: str) -> list[dict]:
    """Per statistic of a style in IN_WORDS: {statistic, base, words, ceiling, way}, the base drawing the unseen
    contents as they are and in words (no LoRA, the benchmark's seeds and sampling)."""
    from sdlora import GenerateConfig
    contents = [c for c, _ in unseen_contents(DATASETS / style)]

    def draw(prompts: list[str]) -> list[Image.Image]:
        return gen.generate_many([GenerateConfig(prompt=p, seed=s, **SAMPLING) for p in prompts for s in SEEDS], [])

    plain, told = draw(contents), draw([IN_WORDS[style](c) for c in contents])
    _, ceiling_images = styled_and_ceiling(gen.base.vae, style)
    out = []
    colours = judged_colours(style)
    for name, stat in stylestats.STYLE_STATS[style].items():
        base, words, ceiling = (stylestats.mean_stat(stat, ims, colours) for ims in (plain, told, ceiling_images))
        out.append({"style": style, "statistic": name, "base": base, "words": words, "ceiling": ceiling,
                    "way": (words - base) / (ceiling - base) if ceiling != base else float("nan")})
    return out


def words_table(rows: list[dict]) -> str:
    lines = ["| style | statistic | base | in words | ceiling | way |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['style']} | {r['statistic']} | {r['base']:.3f} | {r['words']:.3f} | {r['ceiling']:.3f} | "
              f"{r['way']:.0%} |" for r in rows]
    return "\n".join(lines)


def train_ours(style: str, base: str, out: Path, train_set: dict, lora_set: dict,
               data_set: dict | None = None) -> tuple[str, float, dict]:
    """(LoRA path, seconds, the run's resolved settings) of a LoRA trained by sdlora on datasets/<style>."""
    from sdlora import DataConfig, LoraSpec, TrainConfig, train
    folder = DATASETS / style
    t0 = time.time()
    data = DataConfig(folder=str(folder), trigger=dataset_trigger(folder), **(data_set or {}))
    result = train(data, LoraSpec(**lora_set),
                   TrainConfig(base=base, output_dir=str(out), **{"sample_every": 0, **train_set}))
    config = json.loads((Path(result.lora_path).parent / "config.json").read_text(encoding="utf-8"))
    return str(result.lora_path), time.time() - t0, config


def train_reference(script: Path, style: str, base_dir: Path, out: Path, settings: dict,
                    python: str = sys.executable, threads: int = 1) -> tuple[str, float]:
    """(LoRA path, seconds) of diffusers' DreamBooth LoRA script trained on datasets/<style> with `settings`
    (steps, rank, lr, resolution, seed): one instance prompt for every image, as that script trains, on
    `threads` CPU threads as sdlora's run (left to itself, its torch takes every core)."""
    folder = DATASETS / style
    prompt = f"an image in {dataset_trigger(folder)} style"
    images = Path(tempfile.mkdtemp(prefix=f"ref-{style}-", dir=out))     # the script would read the .txt files too
    for p in sorted(folder.glob("*.png")):
        (images / p.name).write_bytes(p.read_bytes())
    dest = out / f"reference-{style}"
    cmd = [python, str(script), "--pretrained_model_name_or_path", str(base_dir), "--instance_data_dir", str(images),
           "--instance_prompt", prompt, "--output_dir", str(dest), "--resolution", str(settings["resolution"]),
           "--train_batch_size", "1", "--max_train_steps", str(settings["steps"]), "--learning_rate",
           str(settings["lr"]), "--rank", str(settings["rank"]), "--lr_scheduler", "constant", "--lr_warmup_steps",
           "0", "--seed", str(settings["seed"]), "--checkpointing_steps", str(10 ** 9)]
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the reference script {script} failed on {style} (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    lora = dest / "pytorch_lora_weights.safetensors"
    if not lora.is_file():
        raise SystemExit(f"the reference script {script} wrote no {lora.name} in {dest}")
    return str(lora), time.time() - t0


def mean_row(rows: list[Row]) -> Row:
    """One style's rows from several training seeds as one: each statistic's curve averaged (so its way is the
    mean curve's, and whether it is monotone is judged on the seeds' mean moves and their standard error),
    prompts without the trigger judged by their mean move over the triggered prompts' mean move, colour kept
    averaged, and the range of the way at 1 over the seeds."""
    first = rows[0]
    scales = [r.scale for r in rows]
    out = Row(first.style, first.trainer, float(np.mean([r.seconds for r in rows])),
              scale=None if None in scales else float(np.mean(scales)),
              colour_kept=float(np.mean([r.colour_kept for r in rows])),
              colour_base=float(np.mean([r.colour_base for r in rows])),
              seeds_passing=(sum(r.passes() for r in rows), len(rows)))
    for name, s in first.stats.items():
        per = [r.stats[name] for r in rows]
        out.stats[name] = figures(s["styled"], s["ceiling"],
                                  [float(np.mean(v)) for v in zip(*(p["curve"] for p in per))],
                                  [float(np.mean(v)) for v in zip(*(p["untriggered_curve"] for p in per))],
                                  [seed_mean(m) for m in zip(*(p["moves"] for p in per))],
                                  seed_mean([p["total"] for p in per]))
        out.stats[name]["way_range"] = (min(p["way"][-1] for p in per), max(p["way"][-1] for p in per))
    return out


def seed_mean(moves) -> tuple[float, float]:
    """The mean of the seeds' (mean, standard error) moves, and its standard error (the seeds' sampling errors
    taken as independent)."""
    means, errors = zip(*moves)
    return float(np.mean(means)), float(np.sqrt(np.sum(np.square(errors))) / len(errors))


def table(rows: list[Row]) -> str:
    lines = ["| style | statistic | trainer | styled | ceiling | base | way @0.5 | way @1 | monotone | untriggered "
             "| colour kept | file scale | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name, s in row.stats.items():
            spread = f" ({s['way_range'][0]:.0%} to {s['way_range'][1]:.0%})" if "way_range" in s else ""
            spread = f" ±{s['way_se']:.0%}{spread}" if np.isfinite(s["way_se"]) else spread
            trainer = row.trainer if row.seed is None else f"{row.trainer} (seed {row.seed})"
            lines.append(f"| {row.style} | {name} | {trainer} | {s['styled']:.3f} | {s['ceiling']:.3f} | "
                         f"{s['base']:.3f} | {s['way'][1]:.0%} | {s['way'][-1]:.0%}{spread} | "
                         f"{'yes' if s['monotone'] else 'no'} | {s['untriggered']:.2f}x | {row.colour_kept:.0%} | "
                         f"{'-' if row.scale is None else f'{row.scale:.2g}'} | {row.seconds:.0f} |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    """PASS or MISS on sdlora's rows (the means, where there are several seeds), and how many seeds pass alone;
    the rows of the trainers it is compared with (COMPARED) are shown, not judged."""
    ours = [r for r in rows if r.trainer not in COMPARED]
    missed = [r.style for r in ours if not r.passes()]
    bars = (f"way @1 >= {BARS['way']:.0%}, monotone, untriggered <= {BARS['untriggered']:.2f}x, "
            f"colour kept >= {BARS['colour']:.0%}")
    alone = [f"{r.style} {r.seeds_passing[0]}/{r.seeds_passing[1]}" for r in ours if r.seeds_passing]
    seeds = f"; seeds passing alone: {', '.join(alone)}" if alone else ""
    if not missed:
        return f"PASS: every style ({len(ours)}) meets {bars}{seeds}"
    return f"MISS on {', '.join(missed)} ({len(ours) - len(missed)} of {len(ours)} meet {bars}){seeds}"


def load_rows(paths: list[Path], targets=None) -> list[Row]:
    """The per-seed rows of --json reports (runs split over processes or seeds), in the order given; a style,
    trainer and seed in two reports is refused. Rows of an older report, judged against the training images'
    round trips, are judged again against the styled ceiling (`rejudged`) with `targets(style)` (the styled
    images and their round trips); without `targets` such a report is refused."""
    rows: list[Row] = []
    seen: dict[tuple, Path] = {}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
            loaded = [Row(**r) for r in report["rows"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--merge {path}: not a report of this benchmark's --json ({e})")
        for r in loaded:
            if r.style in stylestats.STYLE_STATS and set(r.stats) != set(stylestats.STYLE_STATS[r.style]):
                raise SystemExit(f"--merge {path}: its {r.style} rows were judged by {', '.join(r.stats)}, and "
                                 f"{r.style} is judged by {', '.join(stylestats.STYLE_STATS[r.style])} now; "
                                 "run that style again to join it")
        old = sum(map(judged_the_old_way, loaded))
        try:
            loaded = [up_to_date(r, targets) for r in loaded]
        except LookupError as e:
            raise SystemExit(f"--merge {path}: {e}")
        if old:
            print(f"{path}: {old} rows judged against the training images' round trips, judged again against "
                  "the judged prompts drawn in the style", flush=True)
        for r in loaded:
            key = (r.style, r.trainer, r.seed)
            if key in seen:
                raise SystemExit(f"--merge: {r.style}, {r.trainer}, seed {r.seed} is in both {seen[key]} and {path}; "
                                 "give each run once")
            seen[key] = path
        rows += loaded
    return rows


def styled_ceilings(base: str):
    """style -> (the judged prompts drawn in the style, their round trips through `base`'s VAE), each drawn once
    and the base loaded only when first asked: what judging an older report again needs."""
    cache: dict = {}

    def targets(style: str) -> tuple[list, list]:
        if not cache:
            from sdlora.bases.load import load_base
            cache["vae"] = load_base(base).vae
        if style not in cache:
            cache[style] = styled_and_ceiling(cache["vae"], style)
        return cache[style]
    return targets


def judged_the_old_way(row: Row) -> bool:
    """Whether a report's row was judged against the training images' round trips (before the styled ceiling)."""
    return any("styled" not in s for s in row.stats.values())


def up_to_date(row: Row, targets=None) -> Row:
    """`row` as it is, or, judged the old way, judged again with `targets(style)` (styled_ceilings); LookupError
    when it cannot be: no `targets`, or a report too old to keep what judging it again needs."""
    if not judged_the_old_way(row):
        return row
    if targets is None:
        raise LookupError("an older report, whose ceiling was the training images' round trips and not the judged "
                          "prompts drawn in the style; run it again to join it")
    try:
        return rejudged(row, *targets(row.style))
    except KeyError as e:
        raise LookupError(f"an older report without the figures that judging it again needs ({e}); run it again "
                          "to join it") from None


def rejudged(row: Row, styled: list, ceiling_images: list) -> Row:
    """`row`, judged against the training images' round trips, judged against `styled` (the row's prompts drawn
    in its style) and their round trips: every figure follows from the curves and paired moves the report kept,
    so nothing is drawn again."""
    out = Row(**{**row.__dict__, "stats": {}})
    colours = judged_colours(row.style)
    for name, s in row.stats.items():
        stat = stylestats.STYLE_STATS[row.style][name]
        out.stats[name] = figures(stylestats.mean_stat(stat, styled, colours),
                                  stylestats.mean_stat(stat, ceiling_images, colours),
                                  s["curve"], s["untriggered_curve"], [tuple(m) for m in s["moves"]],
                                  tuple(s["total"]))
        if "values" in s:
            out.stats[name]["values"] = s["values"]
    return out


def means(rows: list[Row]) -> list[Row]:
    """One mean_row per style and trainer, in the rows' order."""
    return [mean_row([r for r in rows if (r.style, r.trainer) == key])
            for key in dict.fromkeys((r.style, r.trainer) for r in rows)]


def report(rows: list[Row], seeds: list[int], path: Path | None) -> None:
    """Print the rows' table (each seed's, then the means, where there are several seeds) and the verdict; with
    `path`, also write every figure there as JSON (what --merge reads)."""
    shown = rows
    if len(seeds) > 1:
        print("Each seed:")
        print(table(rows))
        shown = means(rows)
        print(f"Mean over seeds {', '.join(map(str, seeds))} (way @1: the mean, then the seeds' range):")
    print(table(shown))
    print(verdict(shown))
    if path:
        figures = {"seeds": seeds, "rows": [r.__dict__ for r in rows],
                   "means": [r.__dict__ for r in shown] if shown is not rows else []}
        path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--styles", nargs="+", choices=styles(), default=None, help="default: every dataset")
    parser.add_argument("--base", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field for sdlora's run, e.g. trigger_isolation=0, steps=600")
    parser.add_argument("--lora", action="append", default=[], metavar="FIELD=VALUE",
                        help="a LoraSpec field for sdlora's run, e.g. rank=8, self_attention=true")
    parser.add_argument("--data", action="append", default=[], metavar="FIELD=VALUE",
                        help="a DataConfig field for sdlora's run other than the folder and trigger, e.g. "
                             "num_class_images=10 with class_prompt='an image' (prior preservation)")
    parser.add_argument("--label", default="sdlora", help="the trainer column's name for sdlora's rows")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TRAIN_SEEDS),
                        help="training seeds: each style is trained once per seed and judged by the mean "
                             f"(default {' '.join(map(str, TRAIN_SEEDS))}; one seed's verdict can flip with the seed)")
    parser.add_argument("--words", action="store_true",
                        help="also draw the styles the base has caption words for (neon, hatch) in those words, "
                             "with no LoRA")
    parser.add_argument("--reference", type=Path, help="path of diffusers' train_dreambooth_lora.py to compare with")
    parser.add_argument("--reference-python", default=sys.executable, help="python that runs the reference script")
    parser.add_argument("--whole-unet", action="store_true",
                        help="also fine-tune every weight of the base's U-Net (no adapters, no isolation) on the same "
                             "captions, steps and seed, and judge it beside the LoRA (bench/whole_unet.py)")
    parser.add_argument("--whole-unet-lr", type=float, default=WHOLE_UNET_LR,
                        help=f"--whole-unet's AdamW rate (default {WHOLE_UNET_LR:g})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: join the --json reports of runs split over processes or seeds, and "
                             "print their table and verdict (with --json, write the joined report); an older "
                             "report, judged against the training images' round trips, is judged again (with "
                             "--base: the base it was judged on)")
    a = parser.parse_args(argv)
    if a.merge:
        rows = load_rows(a.merge, styled_ceilings(a.base))
        report(rows, sorted({r.seed for r in rows}), a.json)
        return
    if a.label in COMPARED:
        parser.error(f"--label {a.label!r} names a trainer sdlora is compared with; give sdlora's rows another name")
    if a.reference and not a.reference.is_file():
        parser.error(f"--reference {a.reference}: no such file; give the path of train_dreambooth_lora.py")
    missing = a.reference and C.reference_missing(a.reference_python)
    if missing:
        parser.error(missing)
    base_dir = ROOT / "sdlora" / "base_model" if a.base == "tiny" else Path(a.base)
    if a.reference and not (base_dir / "model_index.json").is_file():
        parser.error(f"--reference needs a diffusers folder as --base (the script loads one); {a.base} is not")
    import torch

    from sdlora import Generator
    from sdlora.bases.load import load_base
    torch.set_num_threads(a.threads)
    train_set, lora_set = parse_sets(a.set), parse_sets(a.lora)
    if "seed" in train_set:
        parser.error("give training seeds with --seeds, not --set seed=...")
    data_set = parse_sets(a.data)
    if {"folder", "trigger"} & set(data_set):
        parser.error("--data folder=/trigger=: each style's dataset gives its own folder and trigger")
    if len(set(a.seeds)) != len(a.seeds):
        parser.error(f"--seeds {' '.join(map(str, a.seeds))}: each seed once")
    gen = Generator(load_base(a.base))
    if a.whole_unet:
        from bench.whole_unet import WholeUnetDrawing, train_whole_unet
        whole = WholeUnetDrawing(gen)
    rows: list[Row] = []          # one per style, trainer and seed
    unchanged: dict = {}          # per style, what every LoRA's judging shares
    with tempfile.TemporaryDirectory(prefix="style-quality-") as scratch:
        tmp = a.runs or Path(scratch)
        for style in a.styles or styles():
            for seed in a.seeds:
                lora, seconds, config = train_ours(style, a.base, tmp, {**train_set, "seed": seed}, lora_set,
                                                    data_set)
                rows.append(judge(gen, style, lora, a.label, seconds, seed, unchanged))
                print(f"{style}: {a.label} seed {seed} {seconds:.0f}s", flush=True)
                if a.whole_unet:
                    whole.restore()
                    delta, whole_s = train_whole_unet(gen.base, DATASETS / style, config["captions"],
                                                      config["steps"], seed, a.whole_unet_lr, config["resolution"])
                    path = whole.save(delta, tmp / f"whole-unet-{style}-seed{seed}.safetensors")
                    rows.append(judge(whole, style, path, WHOLE_UNET, whole_s, seed, unchanged))
                    whole.restore()
                    print(f"{style}: whole U-Net seed {seed} {whole_s:.0f}s", flush=True)
                if a.reference:
                    train, spec = config["train"], config["lora"]
                    settings = {"steps": config["steps"], "rank": spec["rank"], "lr": train["lr"], "seed": seed,
                                "resolution": config["resolution"]}
                    ref, ref_s = train_reference(a.reference, style, base_dir, tmp, settings, a.reference_python,
                                                 a.threads)
                    rows.append(judge(gen, style, ref, REFERENCE, ref_s, seed, unchanged))
                    print(f"{style}: reference seed {seed} {ref_s:.0f}s", flush=True)
    report(rows, a.seeds, a.json)
    worded = [r for style in (a.styles or styles()) if a.words and style in IN_WORDS for r in in_words(gen, style)]
    if worded:
        print("The base alone, asked in its own words:")
        print(words_table(worded))


if __name__ == "__main__":
    main()
