"""Helpers shared by the benchmarks: device choice, timing, peak memory, machine load, tables.

Benchmarks print figures measured side by side in one run; nothing here asserts.
Memory is measured by ``sdlora.training.hardware.PeakMemory``, as the trainer reports it:
``torch.cuda.max_memory_allocated`` on a GPU and peak RSS on a CPU (``VmHWM`` in
/proc/self/status, reset by writing 5 to /proc/self/clear_refs, Linux >= 4.0; where
that is refused, the process-lifetime ``ru_maxrss``).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:             # run as `python bench/x.py` from a checkout, sdlora not installed
    sys.path.insert(0, str(ROOT))

GIB = 2 ** 30


def __getattr__(name: str):
    """``C.PeakMemory`` is sdlora.training.hardware's, imported on first use: importing torch here would come
    before ``pick_device`` hides the GPUs for --device cpu."""
    if name == "PeakMemory":
        from sdlora.training.hardware import PeakMemory
        return PeakMemory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def reference_missing(python: str) -> str | None:
    """Why diffusers' DreamBooth LoRA script cannot run under `python` (it imports torchvision, which sdlora does
    not need, at its top), or None when it can: checked before any training, not minutes in."""
    import subprocess
    done = subprocess.run([python, "-c", "import torchvision.transforms"], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return (f"{python} cannot import torchvision, which the reference script imports ({last}); install the "
            f"torchvision built for its torch")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu (cuda runs in fp16)")
    parser.add_argument("--base", default="sd15-random", help="base model name for sdlora.bases.load.load_base")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 keeps torch's default")


def pick_device(choice: str | None) -> str:
    """Resolve --device before sdlora is imported; 'cpu' also hides GPUs so accelerate stays on the CPU."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    if choice is None:
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch here; run with --device cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return choice


def set_threads(n: int) -> None:
    import torch
    if n > 0:
        torch.set_num_threads(n)


def sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def start(args, device: str):
    """Print the machine, start the load log and the memory meter, build the base; returns
    (load, mem, base, seconds the base took to build)."""
    import torch

    from sdlora.training.hardware import PeakMemory
    from sdlora.bases.load import load_base
    print(describe_machine(device))
    load, mem = LoadLog(), PeakMemory(device)
    t0 = time.perf_counter()
    dtype = torch.float16 if device == "cuda" else torch.float32
    base = load_base(args.base, dtype=dtype, device=device, fresh=True)
    return load, mem, base, time.perf_counter() - t0


class LoadLog:
    """1-minute load averages sampled while the benchmark runs (the machine may be shared)."""

    def __init__(self):
        self.samples = [os.getloadavg()[0]]

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        s = self.samples
        return (f"1-min load average during the run: min {min(s):.2f}, mean {statistics.mean(s):.2f}, "
                f"max {max(s):.2f} on {os.cpu_count()} CPUs ({len(s)} samples)")


def describe_machine(device: str) -> str:
    import torch
    la = os.getloadavg()
    parts = [f"device {device}", f"torch {torch.__version__}", f"{torch.get_num_threads()} torch threads",
             f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
             f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} (1/5/15 min) at start"]
    if device == "cuda":
        parts.insert(1, torch.cuda.get_device_name())
    text = "; ".join(parts)
    if device == "cpu" and la[0] > (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        text += ("\nnote: the machine is busier than its core count; with several torch threads each op waits "
                 "for its slowest thread, so timings swing widely. --threads 1 gives steadier figures.")
    return text


def timed(fn, device: str) -> float:
    """Wall seconds for one call of ``fn``, with the GPU drained before and after."""
    return timed2(fn, device)[0]


def timed2(fn, device: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call of ``fn``.

    On a shared CPU the wall time includes the time other processes held the cores;
    the process CPU time does not, so with one torch thread it counts the work done.
    (With several threads it also counts threads spinning at OpenMP barriers.)
    """
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    """min..max of the timed repeats, so a reader sees how noisy a shared machine was."""
    return f"{min(xs):.3g}..{max(xs):.3g}"


def table(headers: list[str], rows: list[list]) -> str:
    """Right-aligned text table; floats as given (format them before)."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def verdict(value: float, target: float, what: str, unit: str = "") -> str:
    """One line: the measured value against its target (at most ``target``)."""
    mark = "PASS" if value <= target else "MISS"
    return f"{mark}  {what}: {value:.3f}{unit} (target <= {target:g}{unit})"


def make_images(folder: Path, n: int, size: int) -> Path:
    """n small flat-colour images (training needs >= 3; their content does not matter for timing)."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), (20 + 60 * i, 30, 200 - 40 * i))
        ImageDraw.Draw(img).ellipse((size // 8, size // 8, size - size // 6, size - size // 5),
                                    outline=(250, 250, 40), width=max(2, size // 64))
        img.save(folder / f"img{i}.png")
    return folder
