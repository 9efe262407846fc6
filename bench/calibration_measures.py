"""Calibration measures: the strength each measure picks for a LoRA, against the strengths the style judge passes.

Strength calibration (sdlora.training.calibrate) draws the first training captions at a few strengths after
training and makes the strength whose samples are clearly closest to the training images the file's
strength 1. Which strength comes out depends on what "closest" measures. For each style and training seed,
a LoRA is trained with calibration off (the other settings as given) and:

- judged by bench/style_quality.py's judge as if its file were scaled by each of calibrate.STRENGTHS (the
  benchmark's prompts and sampling seeds, each strength drawn at strength x scale), so which scales pass
  every bar is known;
- drawn on the calibration's captions at each of calibrate.STRENGTHS with `--sets` sets of sampling seeds
  (set 0 holds the seeds a run's own calibration uses; set k adds k x 100), and each measure picks a
  strength per set with calibrate.choose.

Measures:
- **pixels** (sdlora's): calibrate.image_stats of the samples against the training images' VAE round trips,
  decoded from their latents as training's calibration decodes them (float, not 8-bit);
- **latents** (the previous one): each latent channel's mean, spread and neighbour difference, of the samples
  encoded by the VAE, against the training images' latents.

The table gives, per measure, how many LoRAs got the same pick on every set, and per set how many LoRAs
pass every bar with the measure's pick and how many styles pass on the mean of their seeds; beside them,
every file kept at 1, and the LoRAs that pass at some scale (the most any measure can find).

    python bench/calibration_measures.py                  # every style, seeds 0 1 2 (about 80 s per LoRA on CPU)
    python bench/calibration_measures.py --styles sage dusk --seeds 0 --sets 2
    python bench/calibration_measures.py --styles neon pastel hatch halftone --json a.json   # one process,
    python bench/calibration_measures.py --styles dusk dashed sage --json b.json            # and another
    python bench/calibration_measures.py --merge a.json b.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import style_quality as sq  # noqa: E402

SETS = 3            # sets of sampling seeds per calibration
SET_STRIDE = 100    # set k draws caption i with sampling seed (training seed + k x SET_STRIDE + i)
MEASURES = ("pixels", "latents")


@dataclass
class Probe:
    """One uncalibrated LoRA: its judged rows per scale, and each measure's distances per set of sampling seeds."""
    style: str
    seed: int
    rows: dict = field(default_factory=dict)          # scale -> sq.Row
    distances: dict = field(default_factory=dict)     # measure -> [{strength: distance} per set]

    def picks(self, measure: str) -> list[float]:
        from sdlora.training import calibrate
        return [calibrate.choose(d) for d in self.distances[measure]]


def latent_stats(lat):
    """(n, 3 C): each latent channel's mean, standard deviation and mean |difference| of neighbouring latents."""
    import torch
    lat = lat.float()
    grain = (lat[..., 1:, :] - lat[..., :-1, :]).abs().mean((2, 3)) + (lat[..., 1:] - lat[..., :-1]).abs().mean((2, 3))
    return torch.cat([lat.mean((2, 3)), lat.std((2, 3)), grain], 1)


def to_tensor(images):
    """(n, 3, H, W) in 0..1 of RGB images."""
    import torch
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)


def encode(batches, images):
    """Scaled posterior-mean latents of RGB images, as training encodes them (Batches.encode_pixels)."""
    return batches.encode_pixels(to_tensor(images) * 2 - 1)


def distances(gen, lora: str, style: str, captions: dict, seed: int, sets: int) -> dict:
    """measure -> [{strength: distance} per set] for `lora` on the calibration's first captions."""
    from PIL import Image

    from sdlora import GenerateConfig, LoraChoice
    from sdlora.training import calibrate
    from sdlora.training.batches import Batches
    items = list(captions.items())[:calibrate.N_CAPTIONS]
    training = [Image.open(sq.DATASETS / style / name).convert("RGB") for name, _ in items]
    batches = Batches(gen.base, gen.base.vae.device, batch_size=1, flip=False, text_encoder_trains=False)
    latents = encode(batches, training)
    # the pixels' targets: the training latents decoded as training's calibration decodes them (float, not 8-bit)
    trained = {"pixels": calibrate.image_stats(batches.decode_latents(latents)), "latents": latent_stats(latents)}
    out = {m: [] for m in MEASURES}
    for k in range(sets):
        per = {m: {} for m in MEASURES}
        for s in calibrate.STRENGTHS:
            drawn = gen.generate_many([GenerateConfig(prompt=caption, seed=seed + k * SET_STRIDE + i, **sq.SAMPLING)
                                       for i, (_, caption) in enumerate(items)], [LoraChoice(lora, s)])
            per["pixels"][s] = calibrate.distance(calibrate.image_stats(to_tensor(drawn)), trained["pixels"])
            per["latents"][s] = calibrate.distance(latent_stats(encode(batches, drawn)), trained["latents"])
        for m in MEASURES:
            out[m].append(per[m])
    return out


def verdicts(probes: list[Probe], picks: list[float]) -> tuple[int, int]:
    """(LoRAs passing, styles passing on the mean of their seeds) with probe i's file scaled by picks[i]."""
    rows = [p.rows[c] for p, c in zip(probes, picks)]
    styles = dict.fromkeys(p.style for p in probes)
    return (sum(r.passes() for r in rows),
            sum(sq.mean_row([r for p, r in zip(probes, rows) if p.style == s]).passes() for s in styles))


def summary(probes: list[Probe], measures=MEASURES) -> list[dict]:
    """Per measure: {measure, same (LoRAs with one pick on every set), sets: [(LoRAs, styles) per set]}, then
    every file at 1 and the LoRAs passing at some scale."""
    out = []
    for m in measures:
        picks = [p.picks(m) for p in probes]
        sets = len(picks[0])
        out.append({"measure": m, "same": sum(len(set(p)) == 1 for p in picks),
                    "sets": [verdicts(probes, [p[k] for p in picks]) for k in range(sets)]})
    out.append({"measure": "every file at 1", "same": len(probes), "sets": [verdicts(probes, [1.0] * len(probes))]})
    out.append({"measure": "passing at some scale", "same": None,
                "sets": [(sum(any(r.passes() for r in p.rows.values()) for p in probes), None)]})
    return out


def summary_table(lines: list[dict], n: int) -> str:
    out = ["| measure | same pick on every set | LoRAs passing / styles on the mean, per set |", "|---|---|---|"]
    for line in lines:
        same = "-" if line["same"] is None else f"{line['same']} of {n}"
        sets = ", ".join(f"{a}" if b is None else f"{a}/{b}" for a, b in line["sets"])
        out.append(f"| {line['measure']} | {same} | {sets} |")
    return "\n".join(out)


def probe_line(p: Probe) -> str:
    passes = " ".join(f"{c:g}:{'pass' if r.passes() else 'miss'}" for c, r in p.rows.items())
    picks = "; ".join(f"{m} {' '.join(f'{c:g}' for c in p.picks(m))}" for m in p.distances)
    return f"{p.style} seed {p.seed}: {passes} | picks per set: {picks}"


def to_json(probes: list[Probe]) -> dict:
    return {"probes": [{"style": p.style, "seed": p.seed, "distances": p.distances,
                        "rows": {str(c): r.__dict__ for c, r in p.rows.items()}} for p in probes],
            "summary": summary(probes)}


def from_json(report: dict, targets=None) -> list[Probe]:
    """The probes of a --json report (its strengths and scales back to numbers); rows judged against the training
    images' round trips are judged again against the styled ceiling with `targets` (style_quality.load_rows)."""
    def row(r: dict) -> sq.Row:
        try:
            return sq.up_to_date(sq.Row(**r), targets)
        except LookupError as e:
            raise SystemExit(str(e))
    return [Probe(p["style"], p["seed"], {float(c): row(r) for c, r in p["rows"].items()},
                  {m: [{float(s): d for s, d in per.items()} for per in sets] for m, sets in p["distances"].items()})
            for p in report["probes"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--styles", nargs="+", choices=sq.styles(), default=None, help="default: every dataset")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(sq.TRAIN_SEEDS), help="training seeds")
    parser.add_argument("--sets", type=int, default=SETS, help=f"sets of sampling seeds (default {SETS})")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a TrainConfig field, e.g. batch_size=2 (calibration is always off: it is what is probed)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--runs", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="train nothing: the table of earlier runs' --json reports together (e.g. styles split "
                             "over two processes)")
    a = parser.parse_args(argv)
    if a.merge:
        targets = sq.styled_ceilings("tiny")
        probes = [p for f in a.merge for p in from_json(json.loads(f.read_text(encoding="utf-8")), targets)]
        print(summary_table(summary(probes), len(probes)))
        return
    if a.sets < 1:
        parser.error(f"--sets {a.sets}: give 1 or more")
    import torch

    from sdlora import Generator
    from sdlora.bases.load import load_base
    from sdlora.training import calibrate
    torch.set_num_threads(a.threads)
    train_set = {**sq.parse_sets(a.set), "calibrate_strength": False}
    gen = Generator(load_base("tiny"))
    probes: list[Probe] = []
    unchanged: dict = {}
    with tempfile.TemporaryDirectory(prefix="calibration-measures-") as scratch:
        runs = a.runs or Path(scratch)
        for style in a.styles or sq.styles():
            for seed in a.seeds:
                t0 = time.time()
                lora, seconds, config = sq.train_ours(style, "tiny", runs, {**train_set, "seed": seed}, {})
                p = Probe(style, seed)
                drawn: dict = {}        # strength 0.5 is drawn by scale 0.5 (at 1) and scale 1 (at 0.5): once
                p.rows = {c: sq.judge(gen, style, lora, "probe", seconds, seed, unchanged, scale=c, drawn=drawn)
                          for c in calibrate.STRENGTHS}
                p.distances = distances(gen, lora, style, config["captions"], seed, a.sets)
                probes.append(p)
                print(f"{probe_line(p)} ({time.time() - t0:.0f} s)", flush=True)
    lines = summary(probes)
    print(summary_table(lines, len(probes)))
    if a.json:
        a.json.write_text(json.dumps(to_json(probes), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
