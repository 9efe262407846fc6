"""One training run in a background thread, as the web UI shows it: state, progress, losses, samples."""
from __future__ import annotations

import csv
import html
import math
import re
import threading
import traceback
from pathlib import Path

from sdlora.training.loop import Callbacks, train


def duration(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Job(Callbacks):
    """One training run in a background thread; pages poll its fields (``rev`` changes on every update)."""

    def __init__(self, run_dir: Path | None = None):
        self.state = "starting"          # starting, running, stopping, stopped, done, failed
        self.cancel = threading.Event()
        self.run_dir = run_dir
        self.step = self.total = 0
        self.loss, self.eta = math.nan, 0.0
        self.losses: list[tuple[int, float]] = _read_log(run_dir) if run_dir else []
        self.samples: list[tuple[str, str]] = []       # (path, caption), newest first
        self.message, self.error = "", ""
        self.lora_path: Path | None = None
        self.thread: threading.Thread | None = None
        self.rev = 0

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def on_plan(self, plan) -> None:
        self.total, self.rev = plan.steps, self.rev + 1
        if self.state == "starting":           # a Stop pressed while loading stays "stopping"
            self.state = "running"

    def on_step(self, info) -> None:
        self.step, self.total, self.loss, self.eta = info.step, info.total, info.loss, info.eta
        self.losses.append((info.step, info.loss))
        self.rev += 1

    def on_sample(self, step: int, paths: list[Path]) -> None:
        self.run_dir = self.run_dir or paths[0].parent.parent
        new = []
        for p in paths:
            m = re.search(r"seed(\d+)-(\d+)$", p.stem)
            seed, idx = (m.group(1), int(m.group(2))) if m else ("?", 0)
            which = "with trigger" if idx == 0 else "no trigger" if idx == 1 else f"prompt {idx + 1}"
            new.append((str(p), f"step {step}, {which}, seed {seed}"))
        self.samples = new + self.samples
        self.rev += 1

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.run_dir = self.run_dir or path.parent.parent

    def on_message(self, text: str) -> None:
        self.message, self.rev = text, self.rev + 1

    def run(self, data, spec, cfg, resume) -> None:
        try:
            res = train(data, spec, cfg, callbacks=self, cancel=self.cancel, resume=resume)
            self.run_dir, self.step, self.lora_path = res.run_dir, res.steps_done, res.lora_path
            self.state = "stopped" if res.cancelled else "done"
        except Exception as e:  # any failure is shown on the page; the server keeps running
            traceback.print_exc()
            self.error, self.state = str(e) or type(e).__name__, "failed"
        self.rev += 1

    def status_html(self) -> str:
        pct = 100.0 * self.step / self.total if self.total else 0.0
        loss = f" · loss {self.loss:.4f}" if math.isfinite(self.loss) else ""
        text = {
            "starting": "Starting: loading the base model and caching the images…",
            "running": f"Step {self.step} / {self.total}{loss} · {duration(self.eta)} left",
            "stopping": f"Stopping at step {self.step} / {self.total}: writing a checkpoint…",
            "stopped": f"Stopped at step {self.step} / {self.total}. Press Resume to continue from there.",
            "done": f"Done: {self.step} / {self.total} steps{loss}. Download the LoRA below or open it in Generate.",
            "failed": f"Training failed: {self.error}",
        }[self.state]
        if self.state == "done":
            pct = 100.0
        return progress_html(pct, text, self.state, self.message)


def progress_html(pct: float, text: str, state: str = "idle", note: str = "") -> str:
    """The progress bar with its line of text (and the trainer's last message); all text escaped."""
    note = f'<div class="sdl-msg">{html.escape(note)}</div>' if note else ""
    return (f'<div class="sdl-progress" data-state="{state}"><div class="sdl-bar">'
            f'<div class="sdl-fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="sdl-text">{html.escape(text)}</div>{note}</div>')


def _read_log(run_dir: Path) -> list[tuple[int, float]]:
    try:
        with (Path(run_dir) / "log.csv").open(encoding="utf-8") as fh:
            return [(int(r[0]), float(r[1])) for r in csv.reader(fh) if len(r) >= 2]
    except (OSError, ValueError):
        return []
