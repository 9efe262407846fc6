"""The bases a user has: the built-in one plus every checkpoint and diffusers folder under the models folders.

People keep checkpoints where their other tools look (AUTOMATIC1111's ``models/Stable-diffusion``, ComfyUI's
``models/checkpoints``). ``find_bases`` lists each with its family, variant and size, read from safetensors
headers and config files only (no tensor is loaded), so a folder of 7 GB files is listed in well under a
second. Files that are not SD checkpoints (LoRAs, VAEs, embeddings in the same tree) are left out; checkpoints
sdlora cannot train on (inpainting models, the SDXL refiner, pickle files) are listed with the reason, so the
picker says why instead of hiding a file the user knows is there.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sdlora.bases import families
from sdlora.bases.ldm_keys import LDM_UNET_PREFIX, CheckpointError
from sdlora.bases.variants import detect_family_from_shapes, prediction_evidence, read_header, sdxl_kind

ENV = "SDLORA_MODELS"                  # more models folders, separated like PATH
MAX_DEPTH = 3                          # how deep below a models folder files are looked for
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class BaseEntry:
    """One base as the picker shows it."""
    value: str           # what load_base takes: "tiny" or a path
    name: str            # the file or folder name, relative to its models folder
    family: str          # sd1 | sd2 | sdxl | unknown
    detail: str          # "SD 1.x", "SD 2.x, v-prediction (768 px)", ...
    size: int            # bytes on disk
    problem: str = ""    # why sdlora cannot use it ('' = it can)

    @property
    def label(self) -> str:
        size = f" · {_size(self.size)}" if self.size else ""
        return f"{self.name} · {self.detail}{size}" + (f" · {self.problem}" if self.problem else "")


BUILTIN = BaseEntry("tiny", "tiny (built in)", "sd1", "SD 1.x architecture, 64 px, for trying sdlora", 0)


def models_dirs(given: list[str] | None = None, root: Path | None = None, env: dict | None = None) -> list[Path]:
    """The folders to look in: those given (``--models-dir``), those in $SDLORA_MODELS, and ``models/`` in
    ``root`` (the project); each once, in that order. Missing ones are kept (the picker says they are empty)."""
    env = os.environ if env is None else env
    out: list[Path] = [Path(d).expanduser() for d in (given or [])]
    out += [Path(d).expanduser() for d in env.get(ENV, "").split(os.pathsep) if d.strip()]
    if root is not None:
        out.append(Path(root) / "models")
    seen, unique = set(), []
    for d in out:
        key = str(d.resolve()) if d.exists() else str(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def find_bases(dirs: list[Path]) -> list[BaseEntry]:
    """The built-in base, then every base found under ``dirs``, by folder and name."""
    found = [BUILTIN]
    for root in dirs:
        if not root.is_dir():
            continue
        for path in sorted(_candidates(root, root, 0)):
            entry = describe_base(path, root)
            if entry is not None:
                found.append(entry)
    return found


def _candidates(root: Path, folder: Path, depth: int):
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if (child / "model_index.json").is_file():
                yield child
            elif depth < MAX_DEPTH:
                yield from _candidates(root, child, depth + 1)
        elif child.suffix.lower() in CHECKPOINT_SUFFIXES:
            yield child


def describe_base(path: Path, root: Path | None = None) -> BaseEntry | None:
    """The entry of one checkpoint file or diffusers folder; None when it is not an SD base at all."""
    name = str(path.relative_to(root)) if root is not None else path.name
    if path.is_dir():
        return _describe_folder(path, name)
    if path.suffix.lower() == ".ckpt":
        return BaseEntry(str(path), name, families.UNKNOWN, "pickle checkpoint", _file_size(path),
                         "convert it to .safetensors: a .ckpt can run code when opened")
    try:
        shapes, meta = read_header(path)
    except CheckpointError:
        return None
    family = detect_family_from_shapes(shapes)
    if family == families.UNKNOWN or not any(k.startswith(LDM_UNET_PREFIX) for k in shapes):
        return None                                       # a LoRA, a VAE, an embedding: not a base
    size = _file_size(path)
    inputs = shapes.get(LDM_UNET_PREFIX + "input_blocks.0.0.weight", (0, 4))[1]
    if family == "sdxl":
        kind = sdxl_kind(shapes)
        problem = {"refiner": "the SDXL refiner is not trained on: use an SDXL base",
                   "inpaint": "an inpainting model: not a text-to-image base"}.get(kind, "")
        return BaseEntry(str(path), name, "sdxl", {"base": "SDXL"}.get(kind, f"SDXL {kind}"), size, problem)
    detail = families.title(family)
    if family == "sd2":
        pred = prediction_evidence(path, meta)
        detail += {"v": ", v-prediction (768 px)", "v_prediction": ", v-prediction (768 px)",
                   "epsilon": ", epsilon (512 px)"}.get(pred or "", ", v-prediction assumed (no .yaml beside it)")
    if inputs != 4:
        return BaseEntry(str(path), name, family, detail + f", {inputs}-channel input", size,
                         "an inpainting or other special model: not a text-to-image base")
    return BaseEntry(str(path), name, family, detail, size)


def _describe_folder(path: Path, name: str) -> BaseEntry | None:
    def config(sub: str, file: str = "config.json") -> dict:
        try:
            return json.loads((path / sub / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    unet, te = config("unet"), config("text_encoder")
    size = sum(_file_size(p) for p in path.rglob("*") if p.is_file())
    kind = config("", "model_index.json").get("_class_name", "")
    if (path / "text_encoder_2").is_dir() or unet.get("addition_embed_type") == "text_time":
        problem = "" if kind == "StableDiffusionXLPipeline" else f"a {kind or 'pipeline'}, not an SDXL text-to-image base"
        return BaseEntry(str(path), name, "sdxl", "SDXL (diffusers folder)", size, problem)
    family = families.by_text_width(te.get("hidden_size"))
    if family == families.UNKNOWN:
        family = families.by_context_dim(unet.get("cross_attention_dim"))
    if family == families.UNKNOWN:
        return BaseEntry(str(path), name, families.UNKNOWN, "diffusers folder", size,
                         "not an SD 1.x / 2.x pipeline sdlora knows")
    pred = config("scheduler", "scheduler_config.json").get("prediction_type", "epsilon")
    detail = families.title(family) + (", v-prediction" if pred == "v_prediction" else "") + " (diffusers folder)"
    if unet.get("in_channels", 4) != 4:
        return BaseEntry(str(path), name, family, detail, size, "an inpainting or other special model")
    return BaseEntry(str(path), name, family, detail, size)


def choices(entries: list[BaseEntry]) -> list[tuple[str, str]]:
    """(label, value) pairs for a dropdown."""
    return [(e.label, e.value) for e in entries]


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{max(n, 1) / 2**20:.0f} MB"


__all__ = ["BaseEntry", "BUILTIN", "ENV", "models_dirs", "find_bases", "describe_base", "choices"]
