"""What a training run reports while it runs (`Callbacks`, `StepInfo`) and when it ends (`TrainResult`).

The trainer never imports a front end: the CLI draws a progress bar from these callbacks, the web UI's
job keeps the loss curve and the samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class StepInfo:
    step: int
    total: int
    loss: float
    lr: float
    elapsed: float        # seconds since this process started training
    eta: float            # seconds left, from the mean step time so far


class Callbacks:
    """Override what you need; every method is called on the main process only."""
    def on_run(self, run_dir: Path) -> None: ...    # the run folder (its config.json holds the resolved settings)
    def on_plan(self, plan) -> None: ...            # a training.plan.Plan
    def on_step(self, info: StepInfo) -> None: ...
    def on_sample(self, step: int, paths: list[Path]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    def on_message(self, text: str) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path | None      # None when cancelled before the end
    steps_done: int
    final_loss: float
    cancelled: bool = False
    peak_memory_bytes: int = 0  # CUDA allocator peak on a GPU, the process's peak RSS on a CPU


__all__ = ["Callbacks", "StepInfo", "TrainResult"]
