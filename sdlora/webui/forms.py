"""The web UI's forms: the Train tab's fields as declared settings, turned into configs; uploaded names
made safe. No Gradio here: the tabs use these, and tests call them directly.
"""
from __future__ import annotations

import unicodedata
from pathlib import Path

from sdlora.config import (ConfigError, DataConfig, LoraSpec, Setting, TrainConfig, configs_from_values,
                           settings)
from sdlora.training.plan import suggested

TEMPLATES = {"style": "an image in {trigger} style", "subject": "a photo of {trigger}"}
_BAD_CHARS = set('<>:"/\\|?*')


class UserError(ValueError):
    """Something the user can fix; the message says what."""


def safe_filename(name: str) -> str:
    """A plain file name from an uploaded name: no folders, no '..', no control characters; unicode kept."""
    name = unicodedata.normalize("NFC", str(name)).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable() and c not in _BAD_CHARS).strip().lstrip(".").strip()
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        stem, suffix = name, ""
    while len((stem + dot + suffix).encode("utf-8")) > 200:   # most file systems allow 255 bytes
        stem = stem[:-1]
    return (stem + dot + suffix) if stem else f"file{dot}{suffix}"


def within(path: str | Path, root: str | Path) -> bool:
    """True if `path` (after resolving links and '..') is inside `root`."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except (ValueError, OSError):
        return False


def suggest(n_images: int, base: str = "tiny") -> dict:
    """The derived settings shown before training (training.plan.suggested, which the CLI's runs use too)."""
    return suggested(n_images, base)


def train_controls() -> list[Setting]:
    """The training settings the Train tab shows (basic, then advanced), in declaration order."""
    shown = [s for s in settings() if s.ui in ("basic", "advanced")]
    return [s for s in shown if s.ui == "basic"] + [s for s in shown if s.ui == "advanced"]


def default_form(base: str = "tiny", n_images: int = 0) -> dict:
    """The Train tab's fields as a fresh page shows them: each declared default, derived ones worked out."""
    derived = suggest(n_images, base)
    form = {s.name: derived[s.name] if s.derived else s.default for s in train_controls()}
    form["base"] = base
    return form


def form_of(data: DataConfig, spec: LoraSpec, cfg: TrainConfig) -> dict:
    """The Train tab's fields holding a run's settings (what a page shows for a job it did not start)."""
    objects = {"data": data, "lora": spec, "train": cfg}
    return {s.name: getattr(objects[s.owner], s.name) for s in train_controls()}


def whole(v):
    """Gradio numbers arrive as floats; whole ones become ints, anything else is left for validation."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _field_value(s: Setting, value):
    """A control's value as its setting takes it: numbers arrive as floats (or as text from the boxes that may
    be left empty), an emptied field as None or ''."""
    if isinstance(value, str) and s.kind in (int, float):
        text = value.strip()
        if not text:
            value = None
        else:
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{s.name}={text!r} is not allowed: use a number, or leave it empty") from None
    if value is None:
        return None if s.optional else s.default
    if s.kind is int:
        return whole(value)
    if s.kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value.strip() if isinstance(value, str) and s.name in ("base", "run_name", "trigger") else value


def build_configs(form: dict, folder: str, base: str, outputs: str) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    """The three config objects from the Train tab's fields (named as the settings); ConfigError names a
    bad field. The settings the page manages itself (the dataset folder, the output folder) come from the
    server; a field left out keeps its default."""
    by_name = {s.name: s for s in train_controls()}
    unknown = sorted(set(form) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown setting(s) from the page: {', '.join(unknown)}")
    values = {name: _field_value(by_name[name], v) for name, v in form.items()}
    values.update(folder=folder, output_dir=outputs, base=values.get("base") or base)
    if not values.get("template"):
        values["template"] = TEMPLATES["style"]
    return configs_from_values(values)
