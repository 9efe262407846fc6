"""Run folders: everything that knows how a run is laid out on disk.

Creation without overwriting, the settings record (config.json), the loss log,
checkpoints, the LoRA and its sidecar files, listing, resuming and deleting.
Layout of one run (``outputs/<name>/``)::

    config.json                 settings, library versions, the exact caption of every image
    log.csv                     step, loss, lr, seconds
    samples/step-000100-seed1-0.png
    checkpoints/step-000100/    adapter.safetensors (PEFT tensors) + state.pt (optimizer, schedule, step)
    <name>.safetensors          the LoRA (kohya naming, loads in A1111 / ComfyUI / diffusers)
    <name>.json, <name>.preview.png   A1111's sidecar files
    compat.json                 which keys A1111, ComfyUI and diffusers map (sdlora.loras.check)

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
from safetensors.torch import load_file, save

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

    from sdlora.version import __version__
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


def isolation_images_dir(run_dir: Path) -> Path:
    """Where a run keeps the base's pictures that pass isolation holds the captions without the trigger on."""
    return run_dir / "isolation_images"


def save_latents(path: Path, latents: dict[str, torch.Tensor]) -> None:
    """Latents as a safetensors file, written atomically."""
    atomic_write_bytes(path, save({k: v.detach().float().cpu().contiguous() for k, v in latents.items()}))


def load_latents(path: Path) -> dict[str, torch.Tensor] | None:
    """The latents save_latents wrote, or None when the file is missing or cannot be read (they are drawn again)."""
    if not path.is_file():
        return None
    try:
        return load_file(path)
    except Exception:               # a damaged file: the pictures are drawn again, as for a new run
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))
             and (p / "state.pt").is_file() and (p / "adapter.safetensors").is_file()]
    return max(found)[1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder (checkpoints/step-000100) was saved at."""
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


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


# ---- config.json: the settings a run was started with, resolved ---------------------------------------

def run_config(data, spec, cfg, plan, num_processes: int = 1) -> dict:
    """config.json's content: the three configs (derived settings filled in), captions, problems, versions."""
    from sdlora.config import to_dict
    return {"data": to_dict(data), "lora": to_dict(spec), "train": to_dict(cfg), "steps": plan.steps,
            "num_processes": num_processes, "resolution": plan.resolution, "captions": plan.captions,
            "images": plan.images(),
            "problems": [{"path": q.path, "reason": q.reason, "fatal": q.fatal} for q in plan.problems],
            "versions": library_versions(), "started_at": now_iso()}


def read_run_config(run_dir: Path):
    """(DataConfig, LoraSpec, TrainConfig) a run was started with; RunError if it is not a run folder."""
    from sdlora.config import DataConfig, LoraSpec, TrainConfig, from_dict
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not an sdlora run folder (no config.json); pass the folder of a run")
    raw = json.loads(path.read_text(encoding="utf-8"))
    raw["data"].setdefault("buckets", False)     # runs started before buckets existed trained on square crops
    train_cfg = dict(raw["train"], steps=raw["steps"])
    train_cfg.setdefault("isolation_images", "training")   # runs started before the pass held the base's pictures
    return (from_dict(DataConfig, raw["data"]), from_dict(LoraSpec, raw["lora"]), from_dict(TrainConfig, train_cfg))


class RunError(RuntimeError):
    """A run folder cannot be used as asked (the message says why and what to do)."""


# ---- log.csv -------------------------------------------------------------------------------------------

def open_log(run_dir: Path, start: int):
    """log.csv (step, loss, lr, seconds) for appending; on resume, rows past the checkpoint's step (from a
    killed run) are dropped first."""
    path = run_dir / "log.csv"
    if start and path.is_file():
        rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r and int(r.split(",", 1)[0]) <= start]
        atomic_write_bytes(path, ("".join(r + "\n" for r in rows)).encode("utf-8"))
    return path.open("a", encoding="utf-8")


def read_log(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) rows of a run's log.csv; [] when there is none."""
    import csv
    try:
        with (Path(run_dir) / "log.csv").open(encoding="utf-8") as fh:
            return [(int(r[0]), float(r[1])) for r in csv.reader(fh) if len(r) >= 2]
    except (OSError, ValueError):
        return []


# ---- the LoRA files of an outputs folder ---------------------------------------------------------------

def lora_files(outputs: Path) -> list[Path]:
    """LoRA files in outputs/ and in its run folders (not checkpoints, not hidden folders), newest first."""
    found = [*outputs.glob("*.safetensors"), *outputs.glob("*/*.safetensors")]
    found = [p for p in found if p.is_file() and not any(s.startswith(".") for s in p.relative_to(outputs).parts)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def lora_with_sidecars(path: Path) -> list[Path]:
    """The LoRA and those of its A1111 sidecar files (<name>.json, <name>.preview.png) that exist."""
    return [f for f in (path, sidecar_json_path(path), preview_path(path)) if f.is_file()]


# ---- the names of a run's files -------------------------------------------------------------------------

def lora_path(run_dir: Path) -> Path:
    """<run>/<run>.safetensors: the LoRA a finished run exports."""
    return Path(run_dir) / f"{Path(run_dir).name}.safetensors"


def sidecar_json_path(lora: Path) -> Path:
    """A1111's <name>.json beside a LoRA (activation text, preferred weight, sd version)."""
    return lora.with_suffix(".json")


def preview_path(lora: Path) -> Path:
    """A1111's <name>.preview.png beside a LoRA (its card image)."""
    return lora.parent / f"{lora.stem}.preview.png"


def compat_path(run_dir: Path) -> Path:
    """compat.json: which keys each tool maps (sdlora.loras.check), written at export."""
    return Path(run_dir) / "compat.json"


def sample_path(run_dir: Path, step: int, seed: int, prompt_index: int) -> Path:
    """samples/step-000100-seed1-0.png; prompt 0 has the trigger, prompt 1 is the same without it."""
    return Path(run_dir) / "samples" / f"step-{step:06d}-seed{seed}-{prompt_index}.png"


def sample_of(path: Path) -> tuple[int, int] | None:
    """(seed, prompt index) of a sample_path, or None for another file."""
    m = re.search(r"seed(\d+)-(\d+)$", Path(path).stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


def resumable_runs(outputs: Path) -> list[tuple[Path, int]]:
    """(run folder, step of its last checkpoint) of each run that stopped before its LoRA, newest first."""
    stopped = [(d, latest_checkpoint(d)) for d in outputs.iterdir() if d.is_dir() and not d.name.startswith(".")
               and (d / "config.json").is_file() and not lora_path(d).exists()]
    stopped.sort(key=lambda dc: dc[0].stat().st_mtime, reverse=True)
    return [(d, checkpoint_step(ckpt)) for d, ckpt in stopped if ckpt is not None]


def delete_lora(path: Path, outputs: Path) -> str:
    """Delete a LoRA of `outputs`: its whole run folder when it has one, else the file and its sidecars."""
    run, outputs = path.parent, Path(outputs).resolve()
    if run.resolve() != outputs and (run / "config.json").is_file():
        shutil.rmtree(run)
        return f"Deleted the run folder {run.name} (LoRA, samples, checkpoints)."
    for f in lora_with_sidecars(path):
        f.unlink(missing_ok=True)
    if run.resolve() != outputs and not any(run.iterdir()):
        run.rmdir()
    return f"Deleted {path.name}."


__all__ = ["RunError", "run_config", "read_run_config", "open_log", "read_log", "lora_files", "lora_with_sidecars",
           "lora_path", "sidecar_json_path", "preview_path", "compat_path", "sample_path", "sample_of",
           "resumable_runs", "delete_lora", "safe_name", "new_run_dir", "library_versions", "write_json", "write_png",
           "now_iso", "save_checkpoint", "latest_checkpoint", "checkpoint_step", "load_checkpoint"]
