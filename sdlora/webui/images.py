"""The Train tab's images: uploads copied into a dataset folder, example datasets, captions edited in place.

Each image shows as a card (`Row`) exactly as it will train: the crop, the caption, and any problem.
"""
from __future__ import annotations

import html
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sdlora.bases.load import native_geometry, native_resolution
from sdlora.config import ConfigError, DataConfig
from sdlora.data import buckets as bucketing
from sdlora.data import scan as dataset
from sdlora.data.captions import folder_defaults, has_trigger, readme_trigger
from sdlora.safefiles import atomic_write_bytes
from sdlora.training.plan import suggested
from sdlora.webui.forms import TEMPLATES, UserError, safe_filename, whole, within

MAX_FILES = 200                 # per dataset (data.MANY_IMAGES: more rarely helps a style)
MAX_FILE_BYTES = 25 * 2**20     # per image or caption file
MAX_TOTAL_BYTES = 500 * 2**20   # per dataset
_EXAMPLE_EXTRAS = {"readme.md", "readme.txt", "sdlora.json"}   # example-folder files that are not training data


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
    multiple: int = 64                                      # bucket sides are multiples of this (the base's)
    buckets: bool = True                                    # aspect-ratio buckets, as DataConfig.buckets
    items: list = field(default_factory=list)
    problems: list = field(default_factory=list)
    fits: list = field(default_factory=list)                # per item: its bucket and crop (data.buckets.Fit)
    upload_notes: list[str] = field(default_factory=list)   # files refused at upload (limits)
    base: str = "tiny"                                      # the base it will train on (its suggested steps)

    def scan(self) -> None:
        self.items, self.problems = dataset.scan_dataset(self.folder, self.trigger, self.template, self.resolution)
        self.fits = bucketing.assign([it.size for it in self.items], self.resolution, self.multiple, self.buckets)

    def rows(self) -> list[Row]:
        out = []
        for it, fit in zip(self.items, self.fits):
            notes = list(it.notes)
            if it.caption_source == "template":         # no .txt: say so, so a missing caption is never silent
                notes.insert(0, "no caption file: it trains with the template caption; edit it here to give it one")
            out.append(Row(it.path.name, str(self.preview(it.path, fit.bucket)), it.caption, notes, True))
        for p in self.problems:
            if p.fatal and Path(p.path) != self.folder:
                out.append(Row(Path(p.path).name, None, "", [p.reason], False))
        return out

    def preview(self, path: Path, bucket: tuple[int, int]) -> Path:
        """The image as it will be trained (EXIF rotation, alpha on white, its bucket's crop), cached per size."""
        out = self.folder / ".preview" / f"{bucket[0]}x{bucket[1]}-{path.stem}.png"
        if not out.is_file() or out.stat().st_mtime < path.stat().st_mtime:
            out.parent.mkdir(exist_ok=True)
            dataset.load_image(path, self.resolution, bucket).save(out)
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
        if self.fits:
            lines.append(("Buckets (each image trains at its own shape): " if self.buckets else
                          "No buckets, every image is cropped to a square: ") + bucketing.summary(self.fits))
        if n < dataset.MIN_IMAGES:
            lines.append(f"At least {dataset.MIN_IMAGES} usable images are needed before training can start.")
        elif n < 5:
            lines.append("5 to 20 images work best for a style; a few more would help.")
        elif n > 20:
            lines.append(f"More than 20 images is fine; training takes longer ({suggested(n, self.base)['steps']} steps suggested).")
        lines += [f"Note: {p.reason}" for p in self.problems if Path(p.path) == self.folder]
        lines += [f"Not added: {t}" for t in self.upload_notes]
        return "\n\n".join(html.escape(line, quote=False) for line in lines)


def notes_html(row: Row) -> str:
    """A card's notes as an escaped list: warnings, or why the file is not used."""
    cls, prefix = ("sdl-warn", "") if row.usable else ("sdl-fatal", "Not used: ")
    items = "".join(f'<li class="{cls}">{html.escape(prefix + n)}</li>' for n in row.notes)
    return f'<ul class="sdl-notes">{items}</ul>' if items else ""


class ImagesMixin:
    """The WebUI's dataset handlers (state: self.dataset, self.outputs, self.base, self.datasets_dir)."""

    def load_uploads(self, paths: list[str], trigger: str, template: str, resolution=None) -> Dataset:
        """Copy uploaded files into a new dataset folder (names sanitised, limits checked) and scan it."""
        paths = [Path(p) for p in (paths or [])]
        if not paths:
            raise UserError("No files received: drop 5 to 20 images (PNG, JPEG or WebP) on the upload box.")
        if len(paths) > MAX_FILES:
            raise UserError(f"{len(paths)} files uploaded; the limit is {MAX_FILES} per dataset. "
                            "Pick your best images (5 to 20 are enough for a style).")
        folder, notes, total, taken = self._new_dataset_folder(), [], 0, set()
        for p in paths:
            name, size = safe_filename(p.name), p.stat().st_size
            if size > MAX_FILE_BYTES:
                notes.append(f"{name}: {size / 2**20:.1f} MB is over the {MAX_FILE_BYTES // 2**20} MB limit per file; "
                             "use a smaller export of it")
                continue
            if total + size > MAX_TOTAL_BYTES:
                notes.append(f"{name}: the dataset would pass {MAX_TOTAL_BYTES // 2**20} MB in total; "
                             "use fewer or smaller images")
                continue
            stem, suffix, i = Path(name).stem, Path(name).suffix, 1
            while name.lower() in taken:
                i += 1
                name = f"{stem}-{i}{suffix}"
            taken.add(name.lower())
            target = folder / name
            if not within(target, folder):      # cannot happen after safe_filename; checked anyway
                raise UserError(f"refused file name {p.name!r}")
            shutil.copyfile(p, target)
            total += size
        self._keep_edited_captions(folder)
        return self._use(folder, trigger, template, resolution, notes)

    def _keep_edited_captions(self, folder: Path) -> None:
        """Adding files re-uploads the whole list: captions edited before carry over to the same image names."""
        if self.dataset is None:
            return
        for image in folder.iterdir():
            old = self.dataset.folder / f"{image.stem}.txt"
            if image.suffix.lower() != ".txt" and not image.with_suffix(".txt").exists() and old.is_file():
                shutil.copyfile(old, image.with_suffix(".txt"))

    def clear_dataset(self) -> None:
        self.dataset = None

    def load_example(self, name: str, template: str, resolution=None) -> tuple[Dataset, str]:
        """Copy an example dataset from datasets/ (so caption edits never touch it); returns it and its trigger."""
        src = self.datasets_dir / (name or "")
        if not name or not src.is_dir() or not within(src, self.datasets_dir):
            raise UserError(f"No example dataset {name!r} in {self.datasets_dir}; pick one from the list.")
        folder = self._new_dataset_folder()
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.name.lower() not in _EXAMPLE_EXTRAS:
                shutil.copyfile(f, folder / f.name)
        own = folder_defaults(src)
        trigger = own.get("trigger") or readme_trigger(src) or DataConfig.trigger
        return self._use(folder, trigger, own.get("template") or template, resolution, []), trigger

    def examples(self) -> list[str]:
        if not self.datasets_dir.is_dir():
            return []
        return sorted(d.name for d in self.datasets_dir.iterdir() if d.is_dir() and not d.name.startswith("."))

    def rescan(self, trigger: str, template: str, resolution=None, buckets: bool = True) -> Dataset | None:
        """Scan the current dataset again if trigger / template / resolution / buckets changed; None if not."""
        ds = self.dataset
        now = ((trigger or "").strip(), template, self._size(resolution), bool(buckets))
        if ds is None or now == (ds.trigger, ds.template, ds.resolution, ds.buckets):
            return None
        return self._use(ds.folder, trigger, template, resolution, ds.upload_notes, bool(buckets))

    def set_caption(self, name: str, text: str) -> Row:
        """Save an edited caption as the image's .txt file; returns the card as it trains now."""
        ds = self.dataset
        if ds is None:
            raise UserError("Upload images first.")
        image = ds.folder / safe_filename(name)
        if not image.is_file() or not within(image, ds.folder):
            raise UserError(f"{name!r} is not in the current dataset.")
        text = " ".join((text or "").split())
        if text != next((it.caption for it in ds.items if it.path.name == image.name), None):
            atomic_write_bytes(image.with_suffix(".txt"), text.encode("utf-8"))   # only real edits become captions
            ds.scan()
        return next(r for r in ds.rows() if r.name == image.name)

    def _new_dataset_folder(self) -> Path:
        root = self.outputs / ".uploads"
        root.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for i in range(1, 1000):
            folder = root / (f"dataset-{stamp}" + (f"-{i}" if i > 1 else ""))
            try:
                folder.mkdir()
                return folder
            except FileExistsError:
                continue
        raise UserError(f"could not create a dataset folder in {root}")

    def _size(self, resolution) -> int:
        """The training size a field's value means: the number, or the base's own size when it is empty."""
        return whole(resolution) or native_resolution(self.base)

    def _use(self, folder: Path, trigger: str, template: str, resolution, notes: list[str],
             buckets: bool = True) -> Dataset:
        try:
            probe = DataConfig(folder=str(folder), trigger=trigger or "", template=template or TEMPLATES["style"],
                               resolution=whole(resolution) or None, buckets=bool(buckets))
        except ConfigError as e:
            raise UserError(str(e)) from None
        ds = Dataset(folder, probe.trigger, probe.template, self._size(probe.resolution),
                     native_geometry(self.base).multiple, probe.buckets, upload_notes=list(notes),
                     base=self.base)
        ds.scan()
        self.dataset = ds
        return ds

    def edit_captions(self, find: str, replace: str, prefix: str, suffix: str) -> str:
        """Edit every usable image's caption at once: replace `find` (literally, every time) with `replace`, then
        put `prefix` in front and `suffix` at the end (joined with ', '; not where the caption has it already).
        Each changed caption is saved as its image's .txt; returns the dataset summary with how many changed."""
        ds = self.dataset
        if ds is None:
            raise UserError("Upload images first.")
        find, prefix, suffix = find or "", (prefix or "").strip(), (suffix or "").strip()
        changed = 0
        for it in ds.items:
            text = it.caption.replace(find, replace or "") if find else it.caption
            text = " ".join(text.split()).strip(" ,")
            if prefix and not has_trigger(text, prefix):          # as a word or phrase of its own, anywhere
                text = f"{prefix}, {text}"
            if suffix and not has_trigger(text, suffix):
                text = f"{text}, {suffix}"
            if text != it.caption:
                atomic_write_bytes(it.path.with_suffix(".txt"), text.encode("utf-8"))
                changed += 1
        ds.scan()
        return ds.summary() + f"\n\nEdited {changed} caption{'s' * (changed != 1)}."

    def caption_images(self, model: str, overwrite: bool, trigger: str):
        """Caption the dataset's images that have no caption (all of them if `overwrite`), the trigger word in
        front, then rescan so every card shows its new caption to edit. Returns the CaptionReport."""
        from sdlora.data.captioning import EXAMPLE_MODEL, CaptionError, caption_folder
        ds = self.dataset
        if ds is None:
            raise UserError("Upload images or load an example dataset first, then caption them.")
        if not (model or "").strip():
            raise UserError(f"Enter a captioning model: a hub id such as {EXAMPLE_MODEL} (downloaded once), "
                            "or a local folder of one.")
        if (trigger or "").strip() and trigger.strip() != ds.trigger:
            # a new trigger is checked (and the cards rescanned with it) before any caption carries it
            ds = self._use(ds.folder, trigger, ds.template, ds.resolution, ds.upload_notes)
        import torch
        # the GPU when it is free; while a training runs there, the captioner would compete for its memory
        training = getattr(self, "job", None) is not None and self.job.alive()
        device = "cuda" if torch.cuda.is_available() and not training else "cpu"
        try:
            report = caption_folder(ds.folder, model.strip(), overwrite=bool(overwrite), prefix=ds.trigger,
                                    device=device)
        except CaptionError as e:
            raise UserError(str(e)) from None
        ds.scan()
        return report


__all__ = ["Dataset", "Row", "ImagesMixin", "notes_html", "MAX_FILES", "MAX_FILE_BYTES", "MAX_TOTAL_BYTES"]
