"""The web UI's logic: one server-side `WebUI` object and plain handler methods.

The page (`sdlora.webui.page` and its tab modules) only lays out Gradio components and wires them
to these methods, so everything here is testable without a browser. The handlers live with their tab:
`images.ImagesMixin` (the Train tab's images and captions), `jobs.RunsMixin` (start, stop, resume,
progress), `generate_tab.GenerateMixin`, `library_tab.LibraryMixin`. State lives in the `WebUI` object,
not in the browser session: a training keeps running when the tab is closed, and a reopened page shows
it. Handlers raise `UserError` with a message meant for the user; the page shows it as a notice.

Files are written only under `outputs/` (runs, and uploaded datasets in `outputs/.uploads/`) and the
temporary upload folder Gradio writes to.
"""
from __future__ import annotations

import threading
from pathlib import Path

from sdlora.bases.catalog import BaseEntry, describe_base, find_bases
from sdlora.webui.forms import TEMPLATES, UserError, build_configs, default_form, safe_filename, suggest, within
from sdlora.webui.generate_tab import MAX_LORA_BYTES, SWEEP, GenerateMixin
from sdlora.webui.images import MAX_FILE_BYTES, MAX_FILES, MAX_TOTAL_BYTES, Dataset, ImagesMixin, Row, notes_html
from sdlora.webui.jobs import Job, RunsMixin, duration, progress_html
from sdlora.webui.library_tab import LibraryMixin, compat_details, compat_summary, lora_info


class WebUI(ImagesMixin, RunsMixin, GenerateMixin, LibraryMixin):
    """Everything the pages show, shared by every browser tab of this server."""

    def __init__(self, outputs: str | Path = "outputs", base: str = "tiny", datasets_dir: str | Path = "datasets",
                 upload_dir: str | Path | None = None, models_dirs: list[str | Path] | None = None):
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.base, self.datasets_dir = base, Path(datasets_dir)
        self.upload_dir = Path(upload_dir).resolve() if upload_dir else None
        self.dataset: Dataset | None = None
        self.job: Job | None = None
        self.uploaded_loras: list[Path] = []
        self._gen, self._gen_name, self._gen_precision, self.base_loads = None, "", "fp32", 0
        self._lock, self._gen_lock = threading.Lock(), threading.Lock()
        self.models_dirs = [Path(d) for d in (models_dirs or [])]

    def suggestions(self, n_images: int, base: str | None = None) -> dict:
        """The derived settings for this many images on `base` (default: the server's), as the CLI derives them."""
        return suggest(n_images, (base or "").strip() or self.base)

    def bases(self) -> list[BaseEntry]:
        """The base picker's entries: the built-in base, the models folders' checkpoints and folders, and the
        server's --base when it is none of those (a hub id, a path elsewhere)."""
        entries = find_bases(self.models_dirs)
        if self.base not in {e.value for e in entries}:
            path = Path(self.base).expanduser()
            typed = describe_base(path) if path.exists() else None
            entries.insert(1, typed or BaseEntry(self.base, self.base, "unknown", "a path or hub id", 0))
        return entries

    def pick_base(self, base: str) -> str:
        """The Train tab's base from now on (its defaults and the images' sizes follow it)."""
        self.base = (base or "").strip() or self.base
        return self.base

    def base_choices(self, entries: list[BaseEntry] | None = None) -> list[tuple[str, str]]:
        return [(e.label, e.value) for e in (self.bases() if entries is None else entries)]

    def base_note(self, base: str, entries: list[BaseEntry] | None = None) -> str:
        """What the picker says under the picked base: its family and size, or why it cannot be used. `entries`:
        the picker's list when the caller has just read it (the models folders are read once)."""
        base = (base or "").strip()
        entry = next((e for e in (self.bases() if entries is None else entries) if e.value == base), None)
        if entry is None:
            return f"`{base}`: a path or hub id typed in; it is checked when it is loaded." if base else ""
        text = f"**{entry.name}**: {entry.detail}"
        return text + (f". **Cannot be used:** {entry.problem}." if entry.problem else ".")


__all__ = ["WebUI", "UserError", "Dataset", "Row", "Job", "safe_filename", "within", "build_configs", "suggest",
           "default_form", "lora_info", "compat_summary", "compat_details", "duration", "notes_html", "progress_html",
           "TEMPLATES", "MAX_FILES", "MAX_FILE_BYTES", "MAX_TOTAL_BYTES", "MAX_LORA_BYTES", "SWEEP"]
