"""The web UI's Train-tab model: uploaded names made safe, form fields turned into configs, dataset cards.

No Gradio here: sdlora.webui uses these, and tests call them directly.
"""
from __future__ import annotations

import html
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.data import scan as dataset
from sdlora.config import DEFAULT_LR, DataConfig, LoraSpec, TrainConfig, default_steps
from sdlora.bases.load import base_lora_lr

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
    """Settings derived from the number of usable images and the base (shown before training starts)."""
    steps = default_steps(max(n_images, 1))
    lr = base_lora_lr(base) or DEFAULT_LR
    return {"steps": steps, "rank": 4 if n_images < 8 else 8 if n_images <= 30 else 16, "lr": lr,
            "sample_every": max(1, steps // 5), "text_encoder": False}


def _whole(v):
    """Gradio numbers arrive as floats; whole ones become ints, anything else is left for validation."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def build_configs(form: dict, folder: str, base: str, outputs: str) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    """The three config objects from the Train tab's fields; ConfigError names a bad field."""
    f = {k: _whole(v) for k, v in form.items()}
    data = DataConfig(folder=folder, trigger=f["trigger"] or "", template=f["template"] or TEMPLATES["style"],
                      resolution=f["resolution"] or None, flip=bool(f["flip"]))
    spec = LoraSpec(rank=f["rank"], alpha=f["alpha"] or None, dropout=float(f["dropout"] or 0),
                    self_attention=bool(f["self_attention"]), text_encoder=bool(f["text_encoder"]),
                    use_dora=bool(f["use_dora"]), use_rslora=bool(f["use_rslora"]))
    cfg = TrainConfig(base=(f.get("base") or base).strip(), steps=f["steps"] or None, lr=f["lr"],
                      batch_size=f["batch_size"], grad_accum=f["grad_accum"], schedule=f["schedule"],
                      warmup_steps=f["warmup_steps"] or 0, seed=f["seed"] or 0,
                      sample_every=f["sample_every"] or 0, checkpoint_every=f["checkpoint_every"] or 0,
                      mixed_precision=f["mixed_precision"], noise_offset=float(f["noise_offset"] or 0),
                      min_snr_gamma=float(f["min_snr_gamma"]) if f["min_snr_gamma"] else None,
                      trigger_isolation=float(TrainConfig.trigger_isolation if f.get("trigger_isolation") is None
                                              else f["trigger_isolation"]),
                      save_format=f["save_format"], save_dtype=f["save_dtype"], output_dir=outputs,
                      run_name=(f["run_name"] or "").strip())
    return data, spec, cfg


@dataclass
class Row:
    """One image card of the Train tab's gallery."""
    name: str
    preview: str | None          # PNG of the image exactly as trained (None if unusable)
    caption: str                 # the exact caption it trains with
    notes: list[str]             # warnings, or the reason it is skipped
    usable: bool


@dataclass
class Dataset:
    folder: Path
    trigger: str
    template: str
    resolution: int
    items: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    upload_notes: list[str] = field(default_factory=list)   # files refused at upload (limits)

    def scan(self) -> None:
        self.items, self.problems = dataset.scan_dataset(self.folder, self.trigger, self.template, self.resolution)

    def rows(self) -> list[Row]:
        out = []
        for it in self.items:
            out.append(Row(it.path.name, str(self.preview(it.path)), it.caption, list(it.notes), True))
        for p in self.problems:
            if p.fatal and Path(p.path) != self.folder:
                out.append(Row(Path(p.path).name, None, "", [p.reason], False))
        return out

    def preview(self, path: Path) -> Path:
        """The image as it will be trained (EXIF rotation, alpha on white, crop), cached per resolution."""
        out = self.folder / ".preview" / f"{self.resolution}-{path.stem}.png"
        if not out.is_file() or out.stat().st_mtime < path.stat().st_mtime:
            out.parent.mkdir(exist_ok=True)
            dataset.load_image(path, self.resolution).save(out)
        return out

    def summary(self) -> str:
        n, skipped = len(self.items), sum(1 for p in self.problems if p.fatal and Path(p.path) != self.folder)
        noted = sum(1 for it in self.items if it.notes)
        parts = [f"**{n} image{'s' * (n != 1)} ready to train**"]
        if noted:
            parts.append(f"{noted} with notes")
        if skipped:
            parts.append(f"{skipped} skipped (see the reasons below)")
        lines = [", ".join(parts) + "."]
        if n < dataset.MIN_IMAGES:
            lines.append(f"At least {dataset.MIN_IMAGES} usable images are needed before training can start.")
        elif n < 5:
            lines.append("5 to 20 images work best for a style; a few more would help.")
        elif n > 20:
            lines.append(f"More than 20 images is fine; training takes longer ({default_steps(n)} steps suggested).")
        lines += [f"Note: {p.reason}" for p in self.problems if Path(p.path) == self.folder]
        lines += [f"Not added: {t}" for t in self.upload_notes]
        return "\n\n".join(html.escape(line, quote=False) for line in lines)


def notes_html(row: Row) -> str:
    """A card's notes as an escaped list: warnings, or why the file is not used."""
    cls, prefix = ("sdl-warn", "") if row.usable else ("sdl-fatal", "Not used: ")
    items = "".join(f'<li class="{cls}">{html.escape(prefix + n)}</li>' for n in row.notes)
    return f'<ul class="sdl-notes">{items}</ul>' if items else ""
