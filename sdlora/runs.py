"""Run folders: creation without overwriting, settings record, checkpoints, export.

Layout of one run (``outputs/<name>/``)::

    config.json                 settings, library versions, the exact caption of every image
    log.csv                     step, loss, lr, seconds
    samples/step-000100-seed1-0.png
    checkpoints/step-000100/    adapter.safetensors (PEFT tensors) + state.pt (optimizer, schedule, step)
    <name>.safetensors          the LoRA (kohya naming, loads in A1111 / ComfyUI / diffusers)
    <name>.json, <name>.preview.png   A1111's sidecar files

Every file is written to a temporary name, flushed, fsynced and renamed, so a
crash never leaves a half-written file under its final name.
"""
from __future__ import annotations

import io
import json
import os
import platform
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save

from sdlora.safefiles import LoraFileError, atomic_write_bytes, read_lora_file

CHECKPOINT_RE = re.compile(r"^step-(\d{6,})$")


def safe_name(text: str) -> str:
    """A file-system-safe run name from free text (keeps unicode letters)."""
    name = re.sub(r"[^\w.-]+", "-", text.strip(), flags=re.UNICODE).strip("-.")
    return name[:64] or "lora"


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create a run folder that did not exist before: name, name-2, name-3, ...

    ``mkdir`` without ``exist_ok`` is atomic, so two trainings started at once
    with the same name still get two folders.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = root / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not find a free run folder name for {name!r} in {root}")


def library_versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import peft
    import transformers

    from sdlora import __version__
    return {"sdlora": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__}


def write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_png(path: Path, image) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def save_checkpoint(run_dir: Path, step: int, adapters: dict[str, torch.Tensor], state: dict) -> Path:
    """Write checkpoints/step-NNNNNN atomically (a temp folder renamed into place)."""
    final = run_dir / "checkpoints" / f"step-{step:06d}"
    tmp = run_dir / "checkpoints" / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        atomic_write_bytes(tmp / "adapter.safetensors", save({k: v.contiguous() for k, v in adapters.items()}))
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "state.pt", buf.getvalue())
        if final.exists():                       # re-saving the same step (resume then stop at once)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "state.pt").is_file() and (p / "adapter.safetensors").is_file()]
    return max(found)[1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by ``save_checkpoint``, with the checks any file from elsewhere gets:
    the adapter through the safe safetensors reader (header, dtypes, NaN/Inf), the state with
    ``torch.load(weights_only=True)`` so it cannot run code."""
    adapters, _ = read_lora_file(path / "adapter.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:          # UnpicklingError, EOFError, RuntimeError for a damaged zip, ...
        raise LoraFileError(f"{path / 'state.pt'} cannot be read as a training state ({type(e).__name__}); "
                            "the checkpoint is damaged or not sdlora's. Resume from an earlier checkpoint by "
                            "deleting this folder") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "step"} <= set(state):
        raise LoraFileError(f"{path / 'state.pt'} is not an sdlora training state (no optimizer/scheduler/step)")
    return adapters, state


__all__ = ["safe_name", "new_run_dir", "library_versions", "write_json", "write_png", "now_iso",
           "save_checkpoint", "latest_checkpoint", "load_checkpoint"]
