"""Spec: bench/style_quality.py judges a recipe by the mean over its training seeds, and says how each seed did.

One seed's LoRA can pass where another of the same recipe misses, so a style's verdict is that of the seeds'
mean curve, with the range of their way at strength 1 and how many seeds pass alone shown beside it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import style_quality as sq  # noqa: E402
from sdlora.tinybase import stylestats  # noqa: E402


def seed_row(seed: int, curve: list[float], untriggered: list[float], colour: float) -> sq.Row:
    """A row as judge() makes it, for a statistic whose base is curve[0] and whose ceiling is 0."""
    stat = sq.figures(0.0, 0.0, curve, untriggered)
    return sq.Row("dusk", "sdlora", 40.0 + seed, {"dusk_distance": stat}, colour_kept=colour, colour_base=1.0,
                  seed=seed)


def test_a_statistic_s_figures():
    stat = sq.figures(0.0, 0.2, [1.0, 1.05, 0.4], [1.0, 0.94])
    assert stat["way"] == pytest.approx([0.0, -0.0625, 0.75])
    assert not stat["monotone"]                               # back by 6% of the way at 0.5: more than the slack
    assert stat["untriggered"] == pytest.approx(0.1)          # 0.06 over 0.6
    assert sq.figures(0.0, 0.2, [1.0, 1.01, 0.4], [1.0, 1.0])["monotone"]   # back by 1.25%: the slack's wobble


def test_a_step_back_within_the_images_noise_is_no_step_back():
    # four images, each the same prompt and sampling seed at 0, 0.5 and 1: at 0.5 two move forward, two back more
    at = [np.array(v) for v in ([1.0] * 4, [1.25, 0.85, 1.25, 0.85], [0.3, 0.5, 0.3, 0.5])]
    step = sq.paired_move(at[0], at[1])
    assert step == pytest.approx((0.05, 0.2 / 3 ** 0.5))            # the paired moves' mean and standard error
    curve = [float(v.mean()) for v in at]
    noisy = sq.figures(0.0, 0.2, curve, [1.0, 1.0], [step, sq.paired_move(at[1], at[2])],
                       sq.paired_move(at[0], at[2]))
    assert noisy["way"] == pytest.approx([0.0, -0.0625, 0.75])
    assert noisy["step_back"][0] == pytest.approx((0.0625, 0.25 / 3 ** 0.5))   # in shares of the way
    assert noisy["monotone"]                                         # back 6% of the way, but within 2 x 14%
    assert noisy["way_se"] == pytest.approx(0.125 / 3 ** 0.5)
    # every image back by the same 6%: sure, so a step back
    sure = [1.05] * 4
    sure_step = sq.paired_move(at[0], np.array(sure))
    assert not sq.figures(0.0, 0.2, curve, [1.0, 1.0], [sure_step, (-0.65, 0.0)])["monotone"]
    # an image where the statistic is undefined at one strength leaves that pair out, not the others
    nan = float("nan")
    assert sq.paired_move(np.array([1.0, 1.0, nan]), np.array([1.05, 1.15, 2.0])) == pytest.approx((0.1, 0.05))
    assert all(np.isnan(sq.paired_move(np.array([nan]), np.array([1.0]))))


def test_the_mean_of_seeds_is_judged_on_the_mean_curve():
    # seed 0: 90% of the way but back at 0.5 (not monotone); seed 1: 60%, short of the bar
    rows = [seed_row(0, [1.0, 1.05, 0.1], [1.0, 0.9], 1.0), seed_row(1, [1.0, 0.7, 0.4], [1.0, 1.0], 0.5)]
    rows[0].scale, rows[1].scale = 1.0, 0.5              # calibration kept all of seed 0's update, half of seed 1's
    assert [r.passes() for r in rows] == [False, False]
    mean = sq.mean_row(rows)
    stat = mean.stats["dusk_distance"]
    assert stat["curve"] == pytest.approx([1.0, 0.875, 0.25])
    # judged on the seeds' mean moves: the mean, and the standard error of a mean of independent estimates
    assert sq.seed_mean([(0.05, 0.03), (-0.3, 0.04)]) == pytest.approx((-0.125, 0.025))
    assert stat["way"] == pytest.approx([0.0, 0.125, 0.75])
    assert stat["monotone"]
    assert stat["way_range"] == pytest.approx((0.6, 0.9))
    # prompts without the trigger: their mean move (0.05) over the triggered prompts' mean move (0.75)
    assert stat["untriggered"] == pytest.approx(0.05 / 0.75)
    assert mean.colour_kept == pytest.approx(0.75) and mean.seconds == pytest.approx(40.5)
    assert mean.seeds_passing == (0, 2) and mean.seed is None
    assert mean.passes()
    assert sq.verdict([mean]).startswith("PASS") and "seeds passing alone: dusk 0/2" in sq.verdict([mean])
    table = sq.table([mean, *rows])
    assert "| 75% ±0% (60% to 90%) |" in table and "| 0.75 |" in table and "| 0.5 |" in table
    assert mean.scale == pytest.approx(0.75)
    assert "| sdlora (seed 1) |" in table and "| sdlora |" in table


def test_a_mean_short_of_the_bar_misses_though_a_seed_passes():
    rows = [seed_row(0, [1.0, 0.8, 0.5], [1.0, 1.0], 1.0), seed_row(1, [1.0, 0.6, 0.2], [1.0, 1.0], 1.0)]
    assert [r.passes() for r in rows] == [False, True]
    mean = sq.mean_row(rows)
    assert mean.stats["dusk_distance"]["way"][-1] == pytest.approx(0.65)
    assert not mean.passes() and mean.scale is None and "| - |" in sq.table([mean])
    assert sq.verdict([mean]) == ("MISS on dusk (0 of 1 meet way @1 >= 70%, monotone, untriggered <= 0.33x, "
                                  "colour kept >= 70%); seeds passing alone: dusk 1/2")


def test_calibration_measures_are_scored_by_the_judge_s_verdict_at_the_scale_they_pick():
    from bench import calibration_measures as cm
    passes = seed_row(0, [1.0, 0.5, 0.1], [1.0, 1.0], 1.0)        # 90% of the way, monotone, selective
    misses = seed_row(0, [1.0, 0.8, 0.6], [1.0, 1.0], 1.0)        # 40% of the way
    assert passes.passes() and not misses.passes()
    a = cm.Probe("dusk", 0, {0.5: misses, 0.75: passes, 1.0: passes},
                 {"pixels": [{0.5: 3.0, 0.75: 1.0, 1.0: 2.0}] * 2,
                  "latents": [{0.5: 1.0, 0.75: 2.0, 1.0: 2.0}, {0.5: 2.0, 0.75: 2.0, 1.0: 2.1}]})
    b = cm.Probe("dusk", 1, {0.5: passes, 0.75: misses, 1.0: misses},
                 {"pixels": [{0.5: 1.0, 0.75: 2.0, 1.0: 3.0}] * 2, "latents": [{0.5: 3.0, 0.75: 2.0, 1.0: 1.0}] * 2})
    # 0.5 at 1.0 <= 0.8 x 2.0; then 0.75 (the higher of two equal) at 2.0 is not clearly closer than 2.1: 1
    assert a.picks("latents") == [0.5, 1.0] and a.picks("pixels") == [0.75, 0.75] and b.picks("pixels") == [0.5, 0.5]
    lines = {line["measure"]: line for line in cm.summary([a, b])}
    assert lines["pixels"] == {"measure": "pixels", "same": 2, "sets": [(2, 1), (2, 1)]}
    # set 0: a at 0.5 and b at 1 both miss; set 1: a at 1 passes, b at 1 misses, and their mean (65%) misses
    assert lines["latents"] == {"measure": "latents", "same": 1, "sets": [(0, 0), (1, 0)]}
    assert lines["every file at 1"]["sets"] == [(1, 0)] and lines["passing at some scale"]["sets"] == [(2, None)]
    table = cm.summary_table(list(lines.values()), 2)
    assert "| pixels | 2 of 2 | 2/1, 2/1 |" in table and "| passing at some scale | - | 2 |" in table
    # a --json report read back (--merge) gives the same table
    again = cm.from_json(json.loads(json.dumps(cm.to_json([a, b]))))
    assert cm.summary(again) == cm.summary([a, b]) and again[0].rows[0.75].passes()
    # a report whose rows were judged against the training images' round trips is judged again, or refused
    old = json.loads(json.dumps(cm.to_json([a])))
    for row in old["probes"][0]["rows"].values():
        row["stats"]["dusk_distance"]["training"] = row["stats"]["dusk_distance"].pop("styled")
    with pytest.raises(SystemExit, match="older report"):
        cm.from_json(old)
    styled = sq.styled_targets("dusk", sq.unseen_contents(sq.DATASETS / "dusk"))   # ceiling = styled: dusk's 0.008
    rejudged = cm.from_json(old, lambda style: (styled, styled))[0].rows[0.75]
    assert rejudged.stats["dusk_distance"]["ceiling"] == pytest.approx(0.008, abs=1e-3)
    assert rejudged.stats["dusk_distance"]["way"][-1] == pytest.approx(0.9 / (1 - 0.008), rel=1e-3)


def test_a_file_judged_at_several_scales_draws_each_strength_once(tmp_path):
    """calibration_measures judges one file at scales 0.5, 0.75 and 1: strength 0.5 comes from two of them."""
    from safetensors.torch import save_file
    import torch
    lora = tmp_path / "dusk.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    contents = sq.unseen_contents(sq.DATASETS / "dusk")
    styled = sq.styled_targets("dusk", contents)              # each prompt x sampling seed, in judge()'s order
    look = {c: np.asarray(styled[i * len(sq.SEEDS)], dtype=np.float32) for i, (c, _) in enumerate(contents)}
    calls = []

    class Drawing:          # dusk's look for the prompt, brighter the lower the strength; counting what it draws
        def generate_many(self, cfgs, loras):
            strength = loras[0].strength
            calls.extend((cfg.prompt, cfg.seed, strength) for cfg in cfgs)
            return [Image.fromarray(np.clip(look[cfg.prompt.split(", ", 1)[-1]] * (1.8 - 0.8 * strength), 0, 255)
                                    .astype(np.uint8)) for cfg in cfgs]

    trigger = sq.dataset_trigger(sq.DATASETS / "dusk")
    at_zero = [[Image.fromarray(np.clip(look[c] * 1.8, 0, 255).astype(np.uint8)) for c, _ in contents
                for _ in sq.SEEDS]] * 2                        # the base: strength 0, with and without the trigger
    judge_scale = dict(seconds=1.0, seed=0, unchanged={"dusk": (*at_zero, styled, styled)})
    drawn: dict = {}
    rows = {c: sq.judge(Drawing(), "dusk", str(lora), "probe", scale=c, drawn=drawn, **judge_scale)
            for c in (0.5, 0.75, 1.0)}
    per = 2 * sq.N_PROMPTS                                     # images per strength: prompts x sampling seeds
    strengths = sorted({s for _, _, s in calls})
    assert strengths == [0.25, 0.375, 0.5, 0.75, 1.0]           # triggered at 0.5 x c and c, untriggered at c
    assert len(calls) == len(set(calls))                       # nothing drawn twice
    triggered_at_half = [c for c in calls if c[2] == 0.5 and c[0].startswith(trigger)]
    assert len(triggered_at_half) == per
    # the same figures as judging each scale on its own
    alone = sq.judge(Drawing(), "dusk", str(lora), "probe", **judge_scale)
    assert alone.stats["dusk_distance"]["curve"] == rows[1.0].stats["dusk_distance"]["curve"]
    assert rows[0.5].stats["dusk_distance"]["curve"][-1] == rows[1.0].stats["dusk_distance"]["curve"][1]


def test_the_judge_counts_dashed_pieces_in_the_prompt_s_colour(tmp_path):
    """The base draws a backdrop no prompt names, often with saturated specks: judged with each prompt's colour,
    dashed's base is its filled shapes' one piece, not the specks' count."""
    from PIL import ImageDraw
    from safetensors.torch import save_file
    import torch
    from sdlora.tinybase import scenes
    lora = tmp_path / "dashed.safetensors"
    save_file({"x": torch.zeros(1)}, str(lora))
    contents = sq.unseen_contents(sq.DATASETS / "dashed")
    styled = sq.styled_targets("dashed", contents)

    def filled(colour: str) -> Image.Image:      # the prompt's shape, filled, and five specks of another hue
        image = Image.new("RGB", (64, 64), (240, 240, 240))
        draw = ImageDraw.Draw(image)
        scenes.draw_shape(draw, "square", 32, 32, 30, scenes.COLOURS[colour])
        other = scenes.COLOURS["green" if colour != "green" else "red"]
        for x, y in [(2, 2), (58, 3), (3, 58), (58, 58), (30, 1)]:
            draw.rectangle([x, y, x + 2, y + 2], fill=other)
        return image

    class Drawing:              # the style's own images at every strength
        def generate_many(self, cfgs, loras):
            by_prompt = {p: styled[i * len(sq.SEEDS)] for i, (p, _) in enumerate(contents)}
            return [by_prompt[cfg.prompt.split(", ", 1)[-1]] for cfg in cfgs]

    base = [filled(colour) for _, colour in contents for _ in sq.SEEDS]
    assert stylestats.mean_stat(stylestats.dash_pieces, base) == 6        # every speck a piece, without colours
    row = sq.judge(Drawing(), "dashed", str(lora), "probe", 1.0, seed=0,
                   unchanged={"dashed": (base, base, styled, styled)})
    s = row.stats["dash_pieces"]
    assert s["base"] == 1 and s["styled"] == s["ceiling"] == s["curve"][-1] == 8
    assert s["way"] == [0, 1, 1] and s["untriggered_curve"] == [1, 8]


def test_runs_split_over_seeds_are_joined_into_the_same_mean(tmp_path, capsys):
    rows = [seed_row(0, [1.0, 0.8, 0.5], [1.0, 1.0], 1.0), seed_row(1, [1.0, 0.6, 0.2], [1.0, 1.0], 1.0)]
    reports = []
    for row in rows:                                   # one process per seed, each with its own --json
        reports.append(tmp_path / f"seed{row.seed}.json")
        reports[-1].write_text(json.dumps({"seeds": [row.seed], "rows": [row.__dict__], "means": []}))
    joined = tmp_path / "joined.json"
    sq.main(["--merge", *map(str, reports), "--json", str(joined)])
    out = capsys.readouterr().out
    assert "Mean over seeds 0, 1" in out and "| dusk | dusk_distance | sdlora | " in out
    assert out.strip().endswith(sq.verdict([sq.mean_row(rows)]))
    report = json.loads(joined.read_text())
    assert report["seeds"] == [0, 1] and [r["seed"] for r in report["rows"]] == [0, 1]
    assert report["means"][0]["stats"]["dusk_distance"]["way"][-1] == pytest.approx(0.65)
    # the same seed in two reports is refused, naming both
    with pytest.raises(SystemExit, match="seed 0 is in both .*seed0.json and .*seed0.json"):
        sq.main(["--merge", str(reports[0]), str(reports[0])])
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(SystemExit, match="other.json: not a report"):
        sq.main(["--merge", str(tmp_path / "other.json")])
    # a row judged by a statistic the style no longer has (dashed counted every saturated speck as a piece)
    dashed = sq.Row("dashed", "sdlora", 40.0, {"dash_count": sq.figures(8.0, 6.5, [4.0, 1.2, 2.9], [2.5, 2.0])},
                    colour_kept=1.0, colour_base=1.0, seed=0)
    (tmp_path / "dashed.json").write_text(json.dumps({"seeds": [0], "rows": [dashed.__dict__], "means": []}))
    with pytest.raises(SystemExit, match="dashed.json: its dashed rows were judged by dash_count, and dashed is "
                                         "judged by dash_pieces now; run that style again"):
        sq.main(["--merge", str(reports[0]), str(tmp_path / "dashed.json")])



def test_a_report_judged_against_the_training_images_is_judged_again_from_its_curves(tmp_path):
    """A report from before the ceiling was the judged prompts drawn in the style keeps each statistic's curves
    and paired moves: judged again against the styled images, its figures are those a fresh judge would give
    the same images; without the styled images such a report is refused."""
    styled = sq.styled_targets("dusk", sq.unseen_contents(sq.DATASETS / "dusk"))
    ceiling = [Image.fromarray((np.asarray(im) * 0.9).astype(np.uint8)) for im in styled]   # a stand-in round trip
    stat = stylestats.STYLE_STATS["dusk"]["dusk_distance"]
    target = (stylestats.mean_stat(stat, styled), stylestats.mean_stat(stat, ceiling))
    moves, total = [(-0.05, 0.01), (-0.1, 0.02)], (-0.15, 0.02)
    fresh = sq.figures(*target, [0.25, 0.2, 0.1], [0.25, 0.24], moves, total)
    row = sq.Row("dusk", "sdlora", 40.0, {"dusk_distance": dict(fresh)}, colour_kept=1.0, colour_base=1.0, seed=0)
    old = row.__dict__ | {"stats": {"dusk_distance": {**sq.figures(0.007, 0.093, [0.25, 0.2, 0.1], [0.25, 0.24],
                                                                   moves, total)}}}
    old["stats"]["dusk_distance"]["training"] = old["stats"]["dusk_distance"].pop("styled")
    path = tmp_path / "older.json"
    path.write_text(json.dumps({"seeds": [0], "rows": [old], "means": []}))
    assert sq.judged_the_old_way(sq.Row(**old))
    with pytest.raises(SystemExit, match="older.json: an older report"):
        sq.load_rows([path])
    older = json.loads(path.read_text())
    del older["rows"][0]["stats"]["dusk_distance"]["moves"]             # a report from before the paired moves
    (tmp_path / "oldest.json").write_text(json.dumps(older))
    with pytest.raises(SystemExit, match="oldest.json: an older report without the figures .*'moves'"):
        sq.load_rows([tmp_path / "oldest.json"], lambda style: (styled, ceiling))
    again = sq.load_rows([path], lambda style: (styled, ceiling))
    assert not sq.judged_the_old_way(again[0])
    got = again[0].stats["dusk_distance"]
    assert set(got) == set(fresh)
    for key, value in fresh.items():
        np.testing.assert_allclose(np.asarray(got[key], dtype=float), np.asarray(value, dtype=float), err_msg=key)
    assert again[0].stats["dusk_distance"]["way"][-1] == pytest.approx((0.1 - 0.25) / (target[1] - 0.25))


@pytest.mark.parametrize("style", sq.styles())
def test_the_style_s_target_for_a_prompt_is_drawn_by_the_generator_that_drew_its_dataset(style):
    """The generator styled_targets() draws with gives back every image of datasets/<style> pixel for pixel
    from its caption's content, so the judge's targets for unseen prompts are the dataset's style; and each
    target is its prompt: its colour read back, the shape in the middle, one image per sampling seed."""
    from scripts import make_datasets
    folder = sq.DATASETS / style
    kind = make_datasets.STYLES[style]
    for i, content in enumerate(make_datasets.contents(kind.seed, kind.n)):
        assert (folder / f"{i:02d}.txt").read_text(encoding="utf-8").strip() == content.caption()
        drawn = np.asarray(kind.render(content).convert("RGB"))
        assert np.array_equal(drawn, np.asarray(Image.open(folder / f"{i:02d}.png").convert("RGB"))), f"{style} {i}"
    contents = sq.unseen_contents(folder)
    targets = sq.styled_targets(style, contents)
    assert len(targets) == len(contents) * len(sq.SEEDS)
    for k, (prompt, colour) in enumerate(contents):
        image = targets[k * len(sq.SEEDS)]
        assert stylestats.colour_name(image) == colour, prompt
        ys, xs = np.nonzero(stylestats.silhouette(np.asarray(image)))
        middle = ((ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2)
        assert abs(middle[0] - image.height / 2) < 3 and abs(middle[1] - image.width / 2) < 3, (prompt, middle)
    medium = sq.styled_targets(style, [("a medium red circle in the center", "red")])[0]
    large = sq.styled_targets(style, [("a large red circle in the center", "red")])[0]
    width = [np.ptp(np.nonzero(stylestats.shape_mask(np.asarray(im)))[1]) for im in (medium, large)]
    assert width[0] < width[1], width
    with pytest.raises(ValueError, match="'a huge red circle in the center' is not a content caption"):
        sq.styled_targets(style, [("a huge red circle in the center", "red")])


def test_a_step_is_the_time_between_backward_calls_and_its_mean_counts_every_step_of_a_cycle():
    from bench import reference_step as rs
    # (wall, cpu) at each backward call: steps of 1 s, but every 4th step also runs isolation's pass (3 s)
    gaps = [1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    marks = [(0.0, 0.0)]
    for gap in gaps:
        marks.append((marks[-1][0] + gap, marks[-1][1] + gap / 2))
    assert rs.step_times(marks, warmup=1) == pytest.approx((1.0, 0.5))            # the median misses the pass
    assert rs.step_times(marks, warmup=1, mean=True) == pytest.approx((1.5, 0.75))  # 8 steps, 2 passes
    with pytest.raises(SystemExit, match="raise --steps"):
        rs.step_times(marks[:2], warmup=1)


def test_a_python_that_cannot_run_the_reference_script_is_refused_before_any_training(tmp_path):
    from bench import _common as C
    broken, fine = tmp_path / "broken-python", tmp_path / "fine-python"
    broken.write_text("#!/bin/sh\necho 'Traceback ...' >&2\necho \"ModuleNotFoundError: No module named 'torchvision'\" >&2\n"
                      "exit 1\n")
    fine.write_text("#!/bin/sh\nexit 0\n")
    for f in (broken, fine):
        f.chmod(0o755)
    why = C.reference_missing(str(broken))
    assert str(broken) in why and "No module named 'torchvision'" in why and "install the torchvision" in why
    assert C.reference_missing(str(fine)) is None


def test_the_whole_u_net_is_fine_tuned_on_the_captions_and_drawn_at_w_plus_strength_times_its_change(
        tiny_base, style_dir, tmp_path):
    import torch

    from bench import whole_unet as wu
    from sdlora import GenerateConfig, Generator, LoraChoice
    unet = tiny_base.unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    captions = {p.name: f"zq, {p.with_suffix('.txt').read_text(encoding='utf-8')}" for p in sorted(style_dir.glob("*.png"))}
    delta, _ = wu.train_whole_unet(tiny_base, style_dir, captions, steps=3, seed=0, lr=1e-3)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)          # the base is left as it was
    moved = [k for k, d in delta.items() if float(d.abs().max()) > 0]
    assert set(delta) == {k for k, v in before.items() if v.is_floating_point()}
    assert len(moved) > 0.9 * len(delta)                                 # every weight trains, not adapters
    # the same seed trains the same change
    again, _ = wu.train_whole_unet(tiny_base, style_dir, captions, steps=3, seed=0, lr=1e-3)
    assert all(torch.equal(delta[k], again[k]) for k in delta)

    gen = Generator(tiny_base)
    drawing = wu.WholeUnetDrawing(gen)
    path = drawing.save(delta, tmp_path / "whole.safetensors")
    assert sq.strength_scale(path) is None                               # the judge reads it as an uncalibrated file
    key = moved[0]
    drawing.put(path, 0.5)
    assert torch.allclose(unet.state_dict()[key], before[key] + 0.5 * delta[key], atol=1e-6)
    cfg = GenerateConfig(prompt="zq, a circle outline", seed=1, steps=4)
    at_one = np.asarray(drawing.generate(cfg, [LoraChoice(path, 1.0)]), dtype=np.int16)
    at_zero = np.asarray(drawing.generate(cfg, [LoraChoice(path, 0.0)]), dtype=np.int16)
    drawing.restore()
    assert all(torch.equal(before[k], unet.state_dict()[k]) for k in before)
    plain = np.asarray(gen.generate(cfg, []), dtype=np.int16)
    assert np.array_equal(at_zero, plain)                                # strength 0: the base's own image
    assert np.abs(at_one - plain).mean() > 0.5                           # strength 1: the fine-tuned U-Net's


def test_the_verdict_judges_sdlora_s_rows_only():
    ours = seed_row(0, [1.0, 0.5, 0.1], [1.0, 1.0], 1.0)                 # passes
    whole = seed_row(0, [1.0, 0.8, 0.6], [1.0, 1.0], 1.0)                # misses
    whole.trainer = sq.WHOLE_UNET
    reference = seed_row(0, [1.0, 0.8, 0.6], [1.0, 1.0], 1.0)
    reference.trainer = sq.REFERENCE
    assert sq.verdict([ours, whole, reference]).startswith("PASS: every style (1)")
    with pytest.raises(SystemExit):
        sq.main(["--label", sq.WHOLE_UNET, "--styles", "dusk"])


def test_data_settings_reach_the_run_s_dataset_but_not_its_folder_or_trigger(tmp_path, monkeypatch, capsys):
    import sdlora
    seen = {}

    def fake_train(data, spec, cfg):
        seen["data"] = data
        run = tmp_path / "run"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"steps": cfg.steps}), encoding="utf-8")
        return type("Result", (), {"lora_path": run / "lora.safetensors"})()

    monkeypatch.setattr(sdlora, "train", fake_train)
    sq.train_ours("sage", "tiny", tmp_path, {"seed": 0}, {},
                  sq.parse_sets(["num_class_images=10", "class_prompt=a circle"]))
    data = seen["data"]
    assert (data.num_class_images, data.class_prompt) == (10, "a circle")
    assert Path(data.folder) == sq.DATASETS / "sage" and data.trigger == sq.dataset_trigger(sq.DATASETS / "sage")
    for field in ("trigger=other", "folder=elsewhere"):
        with pytest.raises(SystemExit):
            sq.main(["--styles", "dusk", "--data", field])
        assert "each style's dataset gives its own folder and trigger" in capsys.readouterr().err
