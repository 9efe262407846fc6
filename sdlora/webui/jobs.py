"""Training from the web UI: one run at a time in a background thread (`Job`), its progress as the page
shows it, and the handlers that start, stop and resume it (`RunsMixin`)."""
from __future__ import annotations

import html
import json
import math
import threading
import traceback
from pathlib import Path

from sdlora.config import ConfigError
from sdlora.data import scan as dataset
from sdlora.data.captions import without_trigger
from sdlora.runs import (RunError, checkpoint_step, latest_checkpoint, lora_with_sidecars, read_log, read_run_config,
                         resumable_runs, sample_of)
from sdlora.training.events import Callbacks
from sdlora.training.loop import train
from sdlora.webui.forms import UserError, build_configs, form_of, within
from sdlora.webui.results import TimeLeft, base_samples, column_title, write_grid


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
        self.loss = math.nan
        self.losses: list[tuple[int, float]] = read_log(run_dir) if run_dir else []
        self.samples: list[tuple[str, str]] = []       # (path, caption), newest first
        self.message, self.error = "", ""
        self.lora_path: Path | None = None
        self.thread: threading.Thread | None = None
        self.rev = 0
        self.settings: dict | None = None                # the run's settings as the Train tab's fields
        self.prompts: list[str] = []                     # the sample prompts
        self.default_prompts = True                      # prompt 0 with the trigger, prompt 1 the same without
        self.lr = math.nan
        self.time_left, self.eta = TimeLeft(), None
        self.base_paths: dict[int, Path] = {}

    def on_run(self, run_dir: Path) -> None:
        """The run folder is known: read the settings it runs with, and what a resumed run already has."""
        self.run_dir = Path(run_dir)
        try:
            data, spec, cfg = read_run_config(self.run_dir)
        except (RunError, ValueError, OSError):
            return
        self.settings = form_of(data, spec, cfg)
        captions = json.loads((self.run_dir / "config.json").read_text(encoding="utf-8")).get("captions", {})
        first = next(iter(captions.values()), "")
        self.default_prompts = not cfg.sample_prompts
        self.prompts = list(cfg.sample_prompts) or [first, without_trigger(first, data.trigger)]
        self.base_paths = base_samples(self.run_dir)
        if not self.samples:
            self.samples = [(str(p), self.grid_caption(int(p.stem.rsplit("-", 1)[1])))
                            for p in sorted((self.run_dir / "samples").glob("grid-step-*.png"), reverse=True)]
        self.rev += 1

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def on_plan(self, plan) -> None:
        self.total, self.rev = plan.steps, self.rev + 1
        if self.state == "starting":           # a Stop pressed while loading stays "stopping"
            self.state = "running"

    def on_step(self, info) -> None:
        self.step, self.total, self.loss, self.lr = info.step, info.total, info.loss, info.lr
        self.eta = self.time_left.step(info.elapsed, info.step, info.total)
        self.losses.append((info.step, info.loss))
        self.rev += 1

    def on_sample(self, step: int, paths: list[Path]) -> None:
        """One grid per sample step: a row per seed; the base (step 0) beside each prompt's image now."""
        self.run_dir = self.run_dir or paths[0].parent.parent
        if step == 0:
            found = [(sample_of(p), p) for p in paths]
            self.base_paths = {f[0]: p for f, p in found if f is not None and f[1] == 0}
        base = {} if step == 0 else self.base_paths
        grid = write_grid(self.run_dir, step, paths, base, self.default_prompts)
        self.samples = [(str(grid), self.grid_caption(step))] + self.samples
        self.rev += 1

    def grid_caption(self, step: int) -> str:
        when = "before training: what the base draws" if step == 0 else f"step {step}"
        prompts = " · ".join(f"{column_title(i, self.default_prompts)}: “{p}”" for i, p in enumerate(self.prompts))
        return f"{when} · {prompts}" if prompts else when

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
        lr = f" · learning rate {self.lr:.1e}" if math.isfinite(self.lr) else ""
        text = {
            "starting": "Starting: loading the base model and caching the images…",
            "running": f"Step {self.step} / {self.total}{loss}{lr} · " +
                       ("estimating time left" if self.eta is None else f"{duration(self.eta)} left"),
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


class RunsMixin:
    """The WebUI's run handlers (state: self.job, self.dataset, self.outputs, self.base, self._lock)."""

    def start(self, form: dict) -> Job:
        """Start training the current dataset in a background thread; one training at a time."""
        self._refuse_if_busy()
        ds = self.dataset
        if ds is None:
            raise UserError("Add images first: drop them on the upload box or load an example dataset.")
        try:
            data, spec, cfg = build_configs(form, str(ds.folder), self.base, str(self.outputs))
            ds.trigger, ds.template = data.trigger, data.template
            ds.resolution, ds.buckets = data.resolution or ds.resolution, data.buckets
            ds.scan()
            dataset.require_trainable(ds.items, ds.problems, "Your images", show=lambda p: Path(p).name)
        except (ConfigError, dataset.DatasetError) as e:
            raise UserError(str(e)) from None
        except (TypeError, ValueError) as e:        # an emptied number field arrives as None
            raise UserError(f"a setting is empty or not a number ({e}); fill in every field") from None
        return self._launch(Job(), (data, spec, cfg, None))

    def resume(self, run_dir: str) -> Job:
        self._refuse_if_busy()
        run = Path(run_dir or "")
        ckpt = latest_checkpoint(run) if run_dir and within(run, self.outputs) else None
        if ckpt is None:
            raise UserError("Pick a stopped run to resume (one with a checkpoint under outputs/).")
        job = Job(run)
        job.step = checkpoint_step(ckpt)
        return self._launch(job, (None, None, None, str(run)))

    def _refuse_if_busy(self) -> None:
        cur = self.job
        if cur is not None and cur.alive():
            where = f"at step {cur.step} of {cur.total}" if cur.total else "starting up"
            raise UserError(f"A training is already running ({where}). Only one runs at a time: "
                            "press Stop, or wait until it finishes.")

    def _launch(self, job: Job, args) -> Job:
        with self._lock:
            self._refuse_if_busy()
            self.job = job
            job.thread = threading.Thread(target=job.run, args=args, name="sdlora-train", daemon=True)
            job.thread.start()
        return job

    def stop(self) -> str:
        job = self.job
        if job is None or not job.alive():
            return "Nothing is training."
        job.cancel.set()
        job.state, job.rev = "stopping", job.rev + 1
        return "Stopping after the current step; a checkpoint is written so you can resume."

    def progress(self) -> dict:
        """What the Train tab shows about the current (or last) run."""
        job = self.job
        if job is None:
            return {"rev": -1, "html": progress_html(0, "Not started. Add images, check the captions, press Start."),
                    "losses": [], "samples": [], "files": [], "lora": None, "settings": None, "alive": False}
        files = [str(p) for p in lora_with_sidecars(job.lora_path)] if job.lora_path is not None else []
        return {"rev": job.rev, "html": job.status_html(), "losses": list(job.losses), "samples": list(job.samples),
                "files": files, "lora": str(job.lora_path) if job.lora_path else None,
                "settings": dict(job.settings) if job.settings else None, "alive": job.alive()}

    def resumable_runs(self) -> list[tuple[str, str]]:
        """(label, run folder) of each stopped run of outputs/, newest first; not the one training now."""
        busy = self.job.run_dir if self.job is not None and self.job.alive() else None
        return [(f"{d.name} (stopped at step {step})", str(d)) for d, step in resumable_runs(self.outputs) if d != busy]
