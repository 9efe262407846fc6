"""A training step of sdlora's default recipe against a step of diffusers' DreamBooth LoRA example script.

Both trainers run as their users run them, each in its own process, on one diffusers folder (the SD 1.5
architecture with random weights, written once; or --base-folder), the same images, resolution, rank,
batch size 1 and learning rate, one CPU thread each. A step is the time between two consecutive
`Accelerator.backward` calls (both trainers call it once per step), so it holds all of that trainer's
per-step work: the reference script encodes each image with the VAE and its prompt with the text encoder
every step; sdlora caches both before step 1 (not counted: it is done once per run). Rounds alternate
the trainers, so a change in machine load hits both; the ratio is the median of the per-round ratios of
median step CPU time (and wall time). Variants of sdlora (`--ours NAME="FLAGS"`) run in the same rounds.

    python bench/reference_step.py --reference ~/diffusers/examples/dreambooth/train_dreambooth_lora.py
    python bench/reference_step.py --reference PATH --ours default= --ours "pass=--isolation pass" --rounds 4
    python bench/reference_step.py --reference PATH --ours default= \
        --ours "qkvo-every4=--cross-attention qkvo --isolation-every 4" --steps 10 --mean   # a pass every 4th step

Target (learning-quality issue): sdlora's default step <= 0.70x the reference's.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import _common as C  # noqa: E402

TARGET = 0.70
# Run as `python reference_step.py --hook OUT PROGRAM ARGS...`: records each backward call's clocks, then runs
# PROGRAM (a script path, or -m module) as __main__.
HOOK = "--hook"


def run_hooked(out: str, argv: list[str]) -> None:
    import runpy
    import time

    import accelerate
    marks: list[tuple[float, float]] = []
    original = accelerate.Accelerator.backward

    def backward(self, loss, **kwargs):
        marks.append((time.perf_counter(), time.process_time()))
        Path(out).write_text(json.dumps(marks))
        return original(self, loss, **kwargs)

    accelerate.Accelerator.backward = backward
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


def step_times(marks: list, warmup: int, mean: bool = False) -> tuple[float, float]:
    """Median (or mean) (wall, cpu) seconds between consecutive backward calls, after `warmup` steps."""
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])][warmup:]
    if not gaps:
        raise SystemExit(f"only {len(marks)} steps were timed; raise --steps")
    centre = statistics.fmean if mean else statistics.median
    return centre(g[0] for g in gaps), centre(g[1] for g in gaps)


def make_folder(base: str, dest: Path) -> None:
    """The base as a diffusers folder (fp16 on disk; both trainers load it as fp32)."""
    import torch

    from sdlora.bases.load import load_base
    from sdlora.generate import make_pipeline
    b = load_base(base)
    pipe = make_pipeline(b)
    for m in (b.unet, b.vae, b.text_encoder):
        m.to(torch.float16)
    pipe.save_pretrained(dest, safe_serialization=True)


def make_images(dest: Path, size: int, n: int, captions: bool) -> None:
    """n of the neon images at size px; with their captions for sdlora (the reference reads every file as an
    image and trains on its one instance prompt)."""
    from PIL import Image
    dest.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(sorted((ROOT / "datasets" / "neon").glob("*.png"))[:n]):
        Image.open(p).convert("RGB").resize((size, size), Image.BICUBIC).save(dest / f"{i:02d}.png")
        if captions:
            (dest / f"{i:02d}.txt").write_text(p.with_suffix(".txt").read_text())


def timed(cmd: list[str], out: Path, threads: int) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, __file__, HOOK, str(out), *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == HOOK:
        return run_hooked(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="path of diffusers' train_dreambooth_lora.py")
    parser.add_argument("--base", default="sd15-random", help="base to write as the shared diffusers folder")
    parser.add_argument("--base-folder", type=Path, help="use this diffusers folder instead of writing one")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="steps per run (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mean", action="store_true",
                        help="the mean step instead of the median: for variants whose steps differ (--isolation-every "
                             "N: time a multiple of N steps, e.g. --steps 10 --warmup 1 for N = 4 or 8)")
    parser.add_argument("--ours", action="append", default=None, metavar='NAME="FLAGS"',
                        help='an sdlora variant: its name and extra `sdlora train` flags (default: default=)')
    a = parser.parse_args(argv)
    if not a.reference.is_file():
        parser.error(f"--reference {a.reference}: no such file; give the path of train_dreambooth_lora.py")
    missing = C.reference_missing(sys.executable)
    if missing:
        parser.error(missing)
    variants = dict(v.split("=", 1) for v in (a.ours or ["default="]))
    with tempfile.TemporaryDirectory(prefix="reference-step-") as tmp:
        tmp = Path(tmp)
        folder = a.base_folder or tmp / "base"
        if not a.base_folder:
            print(f"writing {a.base} as a diffusers folder ...", flush=True)
            make_folder(a.base, folder)
        make_images(tmp / "images", a.resolution, 4, captions=True)
        make_images(tmp / "ref-images", a.resolution, 4, captions=False)
        common = ["--resolution", str(a.resolution), "--rank", str(a.rank)]
        reference = [str(a.reference), "--pretrained_model_name_or_path", str(folder), "--instance_data_dir",
                     str(tmp / "ref-images"), "--instance_prompt", "an image in neonstyle style", "--output_dir",
                     str(tmp / "ref-out"), "--train_batch_size", "1", "--max_train_steps", str(a.steps),
                     "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
                     "--checkpointing_steps", str(10 ** 9), "--seed", "0", *common]
        # no strength calibration: its 24 images after the last step are not steps, and at 256 px on the SD 1.5
        # architecture they take longer than the steps (the reference script draws nothing either)
        ours = {name: ["-m", "sdlora.cli", "train", "--data", str(tmp / "images"), "--trigger", "neonstyle",
                       "--base", str(folder), "--steps", str(a.steps), "--lr", "1e-4", "--sample-every", "0",
                       "--no-calibrate-strength", "--output-dir", str(tmp / "ours-out"), *common, *shlex.split(flags)]
                for name, flags in variants.items()}
        results: dict[str, list] = {"reference": [], **{n: [] for n in ours}}
        for r in range(a.rounds):
            for name, cmd in [("reference", reference), *ours.items()]:
                marks = timed(cmd, tmp / f"{name}-{r}.json", a.threads)
                results[name].append(step_times(marks, a.warmup, a.mean))
                wall, cpu = results[name][-1]
                print(f"round {r + 1}: {name:12s} step {wall:.2f} s wall, {cpu:.2f} s cpu", flush=True)
    print(f"\n{a.base}, {a.resolution} px, rank {a.rank}, batch 1, {a.threads} thread(s), {a.rounds} rounds, "
          f"{a.steps - 1 - a.warmup} timed steps each ({'mean' if a.mean else 'median'} step)")
    print("| trainer | step wall s | step cpu s | cpu / reference | wall / reference | target |")
    print("|---|---|---|---|---|---|")
    ref = results["reference"]
    for name, rows in results.items():
        cpu_ratio = statistics.median(o[1] / f[1] for o, f in zip(rows, ref))
        wall_ratio = statistics.median(o[0] / f[0] for o, f in zip(rows, ref))
        mark = "" if name == "reference" else ("PASS" if cpu_ratio <= TARGET else "MISS") + f" (<= {TARGET})"
        print(f"| {name} | {statistics.median(x[0] for x in rows):.2f} | {statistics.median(x[1] for x in rows):.2f} "
              f"| {cpu_ratio:.2f} | {wall_ratio:.2f} | {mark} |")


if __name__ == "__main__":
    main()
