"""The web UI's logic: one server-side `WebUI` object and plain handler methods.

`app.py` only lays out Gradio components and wires them to these methods, so
everything here is testable without a browser. State lives in the `WebUI`
object, not in the browser session: a training keeps running when the tab is
closed, and a reopened page shows it. Handlers raise `UserError` with a
message meant for the user; app.py shows it as a notice.

Files are written only under `outputs/` (runs, and uploaded datasets in
`outputs/.uploads/`) and the temporary upload folder Gradio writes to.
"""
from __future__ import annotations

import re
import shutil
import threading
import time
from pathlib import Path

from sdlora.data import scan as dataset
from sdlora.config import ConfigError, DataConfig, GenerateConfig
from sdlora.webui.library import compat_details, compat_summary, example_trigger, lora_files, lora_info
from sdlora.bases.load import native_resolution
from sdlora.runs import latest_checkpoint
from sdlora.webui.forms import (TEMPLATES, Dataset, Row, UserError, _whole, build_configs, notes_html, safe_filename,
                          suggest, within)
from sdlora.webui.jobs import Job, duration, progress_html

MAX_FILES = 200                 # per dataset (data.MANY_IMAGES: more rarely helps a style)
MAX_FILE_BYTES = 25 * 2**20     # per image or caption file
MAX_TOTAL_BYTES = 500 * 2**20   # per dataset
MAX_LORA_BYTES = 1024 * 2**20   # an uploaded LoRA file (SD 1.x LoRAs are 10-300 MB)
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
_EXAMPLE_EXTRAS = {"readme.md", "readme.txt", "sdlora.json"}   # example-folder files that are not training data


# ---- the server-side object --------------------------------------------------------------------

class WebUI:
    """Everything the pages show, shared by every browser tab of this server."""

    def __init__(self, outputs: str | Path = "outputs", base: str = "tiny", datasets_dir: str | Path = "datasets",
                 upload_dir: str | Path | None = None):
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.base, self.datasets_dir = base, Path(datasets_dir)
        self.upload_dir = Path(upload_dir).resolve() if upload_dir else None
        self.dataset: Dataset | None = None
        self.job: Job | None = None
        self.uploaded_loras: list[Path] = []
        self._gen, self._gen_name, self.base_loads = None, "", 0
        self._lock, self._gen_lock = threading.Lock(), threading.Lock()

    # ---- Train tab: data ----
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
        trigger = example_trigger(src)
        return self._use(folder, trigger, template, resolution, []), trigger

    def examples(self) -> list[str]:
        if not self.datasets_dir.is_dir():
            return []
        return sorted(d.name for d in self.datasets_dir.iterdir() if d.is_dir() and not d.name.startswith("."))

    def rescan(self, trigger: str, template: str, resolution=None) -> Dataset | None:
        """Scan the current dataset again if trigger / template / resolution changed; None if nothing changed."""
        ds = self.dataset
        res = _whole(resolution) or native_resolution(self.base)
        if ds is None or ((trigger or "").strip(), template, res) == (ds.trigger, ds.template, ds.resolution):
            return None
        return self._use(ds.folder, trigger, template, resolution, ds.upload_notes)

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
            image.with_suffix(".txt").write_text(text, encoding="utf-8")   # only real edits become caption files
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

    def _use(self, folder: Path, trigger: str, template: str, resolution, notes: list[str]) -> Dataset:
        try:
            probe = DataConfig(folder=str(folder), trigger=trigger or "", template=template or TEMPLATES["style"],
                               resolution=_whole(resolution) or None)
        except ConfigError as e:
            raise UserError(str(e)) from None
        ds = Dataset(folder, probe.trigger, probe.template, probe.resolution or native_resolution(self.base),
                     upload_notes=list(notes))
        ds.scan()
        self.dataset = ds
        return ds

    # ---- Train tab: runs ----
    def start(self, form: dict) -> Job:
        """Start training the current dataset in a background thread; one training at a time."""
        self._refuse_if_busy()
        ds = self.dataset
        if ds is None:
            raise UserError("Add images first: drop them on the upload box or load an example dataset.")
        try:
            data, spec, cfg = build_configs(form, str(ds.folder), self.base, str(self.outputs))
            ds.trigger, ds.template = data.trigger, data.template
            ds.resolution = data.resolution or ds.resolution
            ds.scan()
            dataset.require_trainable(ds.items, ds.problems, ds.folder.name)
        except (ConfigError, dataset.DatasetError) as e:
            raise UserError(str(e)) from None
        except (TypeError, ValueError) as e:        # an emptied number field arrives as None
            raise UserError(f"a setting is empty or not a number ({e}); fill in every field") from None
        return self._launch(Job(), (data, spec, cfg, None))

    def resume(self, run_dir: str) -> Job:
        self._refuse_if_busy()
        run = Path(run_dir or "")
        if not run_dir or not within(run, self.outputs) or latest_checkpoint(run) is None:
            raise UserError("Pick a stopped run to resume (one with a checkpoint under outputs/).")
        job = Job(run)
        job.step = int(latest_checkpoint(run).name.split("-")[1])
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
                    "losses": [], "samples": [], "files": [], "lora": None}
        files = []
        if job.lora_path is not None:
            stem = job.lora_path.parent / job.lora_path.stem
            files = [str(p) for p in (job.lora_path, Path(f"{stem}.json"), Path(f"{stem}.preview.png")) if p.is_file()]
        return {"rev": job.rev, "html": job.status_html(), "losses": list(job.losses), "samples": list(job.samples),
                "files": files, "lora": str(job.lora_path) if job.lora_path else None}

    def resumable_runs(self) -> list[tuple[str, str]]:
        runs = [d for d in self.outputs.iterdir() if d.is_dir() and not d.name.startswith(".")
                and (d / "config.json").is_file() and not (d / f"{d.name}.safetensors").exists()
                and latest_checkpoint(d) is not None]
        runs.sort(key=lambda d: d.stat().st_mtime, reverse=True)
        if self.job is not None and self.job.alive():
            runs = [d for d in runs if d != self.job.run_dir]
        return [(f"{d.name} (stopped at step {int(latest_checkpoint(d).name.split('-')[1])})", str(d)) for d in runs]

    # ---- Generate tab ----
    def generator(self, base: str):
        """The Generator for `base`, loaded once and kept; another base replaces it."""
        from sdlora.generate import Generator
        from sdlora.bases.load import BaseModelError
        base = (base or self.base).strip()
        with self._gen_lock:
            if self._gen is None or self._gen_name != base:
                self._gen = None
                try:
                    self._gen = Generator(base)
                except BaseModelError as e:
                    raise UserError(str(e)) from None
                self._gen_name, self.base_loads = base, self.base_loads + 1
            return self._gen

    def lora_choices(self) -> list[tuple[str, str]]:
        found = [(str(p.relative_to(self.outputs)), str(p)) for p in lora_files(self.outputs)]
        return found + [(f"uploaded: {p.name}", str(p)) for p in self.uploaded_loras if p.is_file()]

    def add_lora_upload(self, path: str) -> str:
        """Accept an uploaded external LoRA (it stays in the temporary upload folder)."""
        from sdlora.loras.layouts import LoraFileError, read_lora_file
        p = Path(path or "")
        if p.suffix.lower() != ".safetensors":
            raise UserError(f"{safe_filename(p.name)}: only .safetensors LoRA files can be uploaded "
                            "(pickle files can run code when opened).")
        if p.stat().st_size > MAX_LORA_BYTES:
            raise UserError(f"{safe_filename(p.name)} is over the {MAX_LORA_BYTES // 2**20} MB limit for a LoRA file.")
        try:
            read_lora_file(p)
        except LoraFileError as e:
            raise UserError(str(e)) from None
        self.uploaded_loras.append(p.resolve())
        return str(p.resolve())

    def _choices(self, slots) -> list:
        from sdlora.generate import LoraChoice
        out = []
        for path, strength, separate, te in slots:
            if not path:
                continue
            if not (within(path, self.outputs) or (self.upload_dir and within(path, self.upload_dir))):
                raise UserError(f"{Path(path).name}: only LoRA files under outputs/ or uploaded here can be used.")
            out.append(LoraChoice(str(path), float(strength), float(te) if separate else None))
        return out

    def generate(self, base: str, slots, gen: dict):
        """One image; moving a strength never reloads the base (the Generator is kept)."""
        from sdlora.loras.layouts import LoraFileError
        cfg, choices = self._gen_config(gen), self._choices(slots)
        g = self.generator(base)
        try:
            image = g.generate(cfg, choices)
        except (LoraFileError, ValueError) as e:
            raise UserError(str(e)) from None
        used = ", ".join(f"{Path(c.path).stem} at {c.strength:g}" for c in choices) or "no LoRA"
        return image, f"Base '{self._gen_name}' (loaded once), {used}, seed {cfg.seed}."

    def sweep(self, base: str, slots, gen: dict) -> list[tuple]:
        """The first LoRA at strengths 0 to 1 with the same seed: one row of images."""
        from sdlora.loras.layouts import LoraFileError
        cfg, choices = self._gen_config(gen), self._choices(slots)
        if not choices:
            raise UserError("Pick a LoRA first: the sweep shows it at strengths 0, 0.25, 0.5, 0.75 and 1.")
        try:
            images = self.generator(base).sweep(cfg, choices[0], SWEEP)
        except (LoraFileError, ValueError) as e:
            raise UserError(str(e)) from None
        return [(im, f"{s:g}") for im, s in zip(images, SWEEP)]

    @staticmethod
    def _gen_config(gen: dict) -> GenerateConfig:
        g = {k: _whole(v) for k, v in gen.items()}
        try:
            return GenerateConfig(prompt=g["prompt"] or "", negative_prompt=g["negative_prompt"] or "",
                                  seed=g["seed"] or 0, steps=g["steps"], guidance=float(g["guidance"]),
                                  width=g["width"] or None, height=g["height"] or None)
        except (ConfigError, TypeError) as e:
            raise UserError(str(e)) from None

    def prompt_for(self, path: str, prompt: str) -> str:
        """The prompt with the LoRA's trigger word in it (pre-filled when a LoRA is picked)."""
        trigger = lora_info(Path(path)).get("trigger", "") if path else ""
        prompt = (prompt or "").strip()
        if not trigger or re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", prompt, re.IGNORECASE):
            return prompt
        return f"{trigger}, {prompt}" if prompt else TEMPLATES["style"].format(trigger=trigger)

    # ---- Library tab ----
    def library(self) -> list[dict]:
        return [lora_info(p) for p in lora_files(self.outputs)]

    def library_view(self) -> tuple[list, list[list[str]], list[tuple[str, str]]]:
        """(preview gallery items, table rows as plain text, dropdown choices) for the Library tab."""
        infos = self.library()
        gallery = [(i["preview"], i["name"]) for i in infos if i["preview"]]
        cols = ("title", "base", "rank", "alpha", "trigger", "steps", "images", "date", "compat")
        table = [[str(Path(i["file"]).relative_to(self.outputs))] +
                 ([str(i.get(c, ""))[:16].replace("T", " ") if c == "date" else str(i.get(c, "")) for c in cols]
                  if "error" not in i else [f"unreadable: {i['error']}"] + [""] * 8)
                 for i in infos]
        return gallery, table, [(row[0], i["file"]) for row, i in zip(table, infos)]

    def details(self, path: str) -> dict:
        """Preview, metadata, compatibility and downloadable files of one library LoRA."""
        p = Path(path or "")
        if not path or p.resolve() not in {q.resolve() for q in lora_files(self.outputs)}:
            return {"preview": None, "metadata": None, "compat": "", "files": []}
        info = lora_info(p)
        files = [f for f in (p, p.with_suffix(".json"), p.parent / f"{p.stem}.preview.png") if f.is_file()]
        meta = {k: v for k, v in info.items() if k not in ("preview", "compat", "name")}
        return {"preview": info["preview"], "metadata": meta, "files": [str(f) for f in files],
                "compat": compat_details(p.parent / "compat.json")}

    def delete(self, path: str) -> str:
        p = Path(path or "")
        if not path or p.resolve() not in {q.resolve() for q in lora_files(self.outputs)}:
            raise UserError("Pick a LoRA from the library to delete.")
        run = p.parent
        job = self.job
        if job is not None and job.alive() and job.run_dir and run.resolve() == Path(job.run_dir).resolve():
            raise UserError("This run is training right now; stop it first.")
        if run.resolve() != self.outputs and (run / "config.json").is_file():
            shutil.rmtree(run)
            return f"Deleted the run folder {run.name} (LoRA, samples, checkpoints)."
        for f in (p, p.with_suffix(".json"), p.parent / f"{p.stem}.preview.png"):
            f.unlink(missing_ok=True)
        if run.resolve() != self.outputs and not any(run.iterdir()):
            run.rmdir()
        return f"Deleted {p.name}."


__all__ = ["WebUI", "UserError", "Dataset", "Row", "Job", "safe_filename", "within", "build_configs", "suggest",
           "native_resolution", "lora_files", "lora_info", "compat_summary", "compat_details", "example_trigger",
           "duration", "notes_html", "progress_html"]
