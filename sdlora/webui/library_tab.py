"""The Library tab: every run under outputs/, finished or stopped, as cards that read at any width; a run's
preview, key check, download, resume and delete; two LoRAs compared on one prompt and seed.

Nothing on the page names a server path: runs are named relative to outputs/, previews are inlined.
"""

import base64
import html
import io
import json
from pathlib import Path
from types import SimpleNamespace

from sdlora.bases import families
from sdlora.runs import (checkpoint_step, compat_path, delete_lora, latest_checkpoint, lora_files, lora_path,
                         lora_with_sidecars, preview_path, resumable_runs)
from sdlora.webui.forms import UserError

FAMILY_FILTERS = ("All bases", "SD 1.x", "SD 2.x", "SDXL")
ORDERS = ("Newest first", "Oldest first", "Name")
EMPTY = ("**No runs yet.** Train one in the **Train** tab: add 5-20 images, check the captions, press **Start**. "
         "Finished and stopped runs appear here.")


def lora_info(path: Path) -> dict:
    """describe() plus the preview and compatibility result; an unreadable file gives its error instead."""
    from sdlora.loras.inspect import describe
    try:
        info = describe(path)
    except Exception as e:  # a damaged file must not break the whole library
        info = {"file": str(path), "error": str(e)}
    info["name"] = path.stem
    preview = preview_path(path)
    info["preview"] = str(preview) if preview.is_file() else None
    info["compat"] = compat_summary(compat_path(path.parent))
    return info


def _compat(path: Path) -> tuple[dict | None, dict]:
    """(the per-tool part of a run's compat.json ({tool: {mapped, total, unmapped, note}}), the whole report);
    (None, {}) if absent, ({}, {}) if unreadable."""
    if not path.is_file():
        return None, {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        tools = report.get("tools", report)
        if all(isinstance(r, dict) and {"mapped", "total"} <= set(r) for r in tools.values()):
            return tools, report
    except (OSError, ValueError, AttributeError):
        pass
    return {}, {}


def compat_summary(path: Path) -> str:
    """'A1111 28/28 · ComfyUI 28/28 · diffusers 28/28' from a compat.json, or '' when there is none."""
    from sdlora.loras.tools import TOOLS
    tools, report = _compat(path)
    if tools is None:
        return ""
    if not tools:
        return "compat.json is not readable"
    if report.get("sd_layout") is False:           # a base A1111 and ComfyUI cannot load: their counts mean nothing
        r = tools["diffusers"]
        return f"diffusers {r['mapped']}/{r['total']} (trained on sdlora's own base: for trying sdlora)"
    return " · ".join(f"{TOOLS.get(t, t)} {r['mapped']}/{r['total']}" for t, r in tools.items())


def compat_details(path: Path) -> str:
    """One line per tool with the keys it would skip, from compat.json."""
    from sdlora.loras.tools import format_report
    tools, report = _compat(path)
    if tools is None:
        return "Not checked: this run folder has no compat.json."
    if not tools:
        return "compat.json is not readable."
    try:
        text = format_report(tools)
    except (KeyError, TypeError):
        return compat_summary(path)
    return text + (f"\n{report['base_note']}" if report.get("base_note") else "")


class LibraryMixin:
    """The WebUI's library handlers (state: self.outputs, self.job)."""

    def library(self) -> list[dict]:
        return [lora_info(p) for p in lora_files(self.outputs)]

    def library_runs(self, family: str = FAMILY_FILTERS[0], order: str = ORDERS[0]) -> list[dict]:
        """Every finished LoRA and every stopped run, as cards show them; filtered by base family and sorted."""
        entries = []
        for info in self.library():
            path = Path(info["file"])
            entries.append({**info, "key": self._key(path), "state": "finished", "time": path.stat().st_mtime})
        busy = Path(self.job.run_dir) if self.job is not None and self.job.alive() and self.job.run_dir else None
        for run, step in resumable_runs(self.outputs):
            if busy is not None and run.resolve() == busy.resolve():
                continue
            entries.append(self._stopped(run, step))
        if family != FAMILY_FILTERS[0]:
            entries = [e for e in entries if e.get("base") == family]
        if order == "Name":
            entries.sort(key=lambda e: e["key"].lower())
        else:
            entries.sort(key=lambda e: e["time"], reverse=order == ORDERS[0])
        return entries

    def _key(self, path: Path) -> str:
        """A run's name on the page: its path relative to outputs/ (the LoRA file, or the stopped run's folder)."""
        return str(Path(path).resolve().relative_to(self.outputs.resolve()))

    def _stopped(self, run: Path, step: int) -> dict:
        config = _read_json(run / "config.json")
        train, data = config.get("train", {}), config.get("data", {})
        return {"key": self._key(run) + "/", "state": "stopped", "step": step, "total": config.get("steps", "?"),
                "name": run.name, "title": train.get("run_name") or run.name, "base": base_family_title(train.get("base", "")),
                "trigger": data.get("trigger", ""), "steps": config.get("steps", ""),
                "images": len(config.get("captions", {})), "rank": config.get("lora", {}).get("rank", ""),
                "date": config.get("started_at", ""), "time": run.stat().st_mtime, "preview": None, "compat": ""}

    def library_path(self, key: str) -> Path:
        """The file or run folder a page key (relative to outputs/, or a path inside it) names."""
        p = Path(key or "")
        return p if p.is_absolute() else self.outputs / p

    def library_view(self, family: str = FAMILY_FILTERS[0], order: str = ORDERS[0]) -> tuple[str, list, str]:
        """(the cards' HTML, the picker's (label, key) choices, the empty-state text or '')."""
        entries = self.library_runs(family, order)
        choices = [(card_label(e), e["key"]) for e in entries]
        if entries:
            empty = ""
        elif family != FAMILY_FILTERS[0] and self.library_runs():
            empty = f"No run on an {family} base; choose *All bases* to see the others."
        else:
            empty = EMPTY
        return cards_html(entries), choices, empty

    def details(self, key: str) -> dict:
        """Preview, metadata, compatibility, downloadable files and state of one library run."""
        none = {"preview": None, "metadata": None, "compat": "", "files": [], "state": "", "stopped": False,
                "lora": None}
        p = self.library_path(key)
        if key and p.is_dir() and (p / "config.json").is_file() and latest_checkpoint(p) is not None \
                and not lora_path(p).exists():
            entry = self._stopped(p, checkpoint_step(latest_checkpoint(p)))
            return {**none, "state": f"Stopped at step {entry['step']} of {entry['total']}. **Resume** continues "
                                     "exactly there; **Delete** removes the run folder.", "stopped": True}
        if not key or p.resolve() not in {q.resolve() for q in lora_files(self.outputs)}:
            return none
        info = lora_info(p)
        meta = {k: v for k, v in info.items() if k not in ("preview", "compat", "name")}
        meta["file"] = self._key(p)                       # no server paths on the page
        return {**none, "preview": info["preview"], "metadata": meta, "files": [str(f) for f in lora_with_sidecars(p)],
                "compat": compat_details(compat_path(p.parent)), "state": "Finished.", "lora": str(p)}

    def delete(self, key: str) -> str:
        p = self.library_path(key)
        stopped = p.is_dir() and (p / "config.json").is_file() and p.resolve() != self.outputs.resolve() \
            and p.resolve().parent == self.outputs.resolve()
        if not key or not (stopped or p.resolve() in {q.resolve() for q in lora_files(self.outputs)}):
            raise UserError("Pick a run from the library to delete.")
        run = p if stopped else p.parent
        job = self.job
        if job is not None and job.alive() and job.run_dir and run.resolve() == Path(job.run_dir).resolve():
            raise UserError("This run is training right now; stop it first.")
        return delete_lora(lora_path(p) if stopped else p, self.outputs)

    def compare(self, key_a: str, key_b: str, prompt: str, seed) -> list[tuple]:
        """Two finished LoRAs at strength 1 on one prompt and seed, on the base they were trained on."""
        from sdlora.config import ConfigError, GenerateConfig
        from sdlora.generate import LoraChoice
        from sdlora.loras.layouts import LoraFileError
        paths = []
        for key in (key_a, key_b):
            p = self.library_path(key)
            if not key or p.resolve() not in {q.resolve() for q in lora_files(self.outputs)}:
                raise UserError("Pick two finished LoRAs to compare (stopped runs have no LoRA yet).")
            paths.append(p)
        bases = [_read_json(p.parent / "config.json").get("train", {}).get("base") or self.base for p in paths]
        if bases[0] != bases[1]:
            raise UserError(f"{self._key(paths[0])} was trained on {Path(bases[0]).name} and {self._key(paths[1])} "
                            f"on {Path(bases[1]).name}: compare LoRAs of one base.")
        try:
            cfg = GenerateConfig(prompt=(prompt or "").strip(), seed=int(seed or 0))
        except (ConfigError, TypeError, ValueError) as e:
            raise UserError(str(e)) from None
        gen = self.generator(bases[0])
        try:
            return [(gen.generate(cfg, [LoraChoice(str(p), 1.0)]), f"{self._key(p)} at 1, seed {cfg.seed}")
                    for p in paths]
        except (LoraFileError, ValueError) as e:
            raise UserError(str(e)) from None


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def base_family_title(base: str) -> str:
    """'SD 1.x' / 'SD 2.x' / 'SDXL' / 'Unknown' for a run's base name, read from the name or the file's header."""
    from sdlora.bases.catalog import describe_base
    if base in ("tiny", "tiny-random", "sd15-random"):
        return families.title("sd1")
    path = Path(base).expanduser()
    entry = describe_base(path) if path.exists() else None
    return families.title(entry.family) if entry and entry.family != families.UNKNOWN else "Unknown"


def card_label(e: dict) -> str:
    state = "finished" if e["state"] == "finished" else f"stopped at step {e['step']} of {e['total']}"
    return f"{e['key']} · {state}"


def _thumbnail(path: str | None) -> str:
    """A preview as a small inline PNG (a data URI: no file path in the page)."""
    if not path:
        return '<div class="sdl-thumb sdl-nothumb">no preview</div>'
    from PIL import Image
    try:
        im = Image.open(path).convert("RGB")
    except OSError:
        return '<div class="sdl-thumb sdl-nothumb">no preview</div>'
    scale = max(1, 96 // max(im.size))
    im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST) if scale > 1 else im
    im.thumbnail((96, 96))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return f'<img class="sdl-thumb" alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def cards_html(entries: list[dict]) -> str:
    """One card per run (wrapping to the width of the screen); every text escaped."""
    out = []
    for e in entries:
        esc = lambda v: html.escape(str(v if v is not None else ""))   # noqa: E731
        if "error" in e:
            body = f"<b>{esc(e['key'])}</b><div class='sdl-warn'>unreadable: {esc(e['error'])}</div>"
        else:
            state = ("<span class='sdl-done'>finished</span>" if e["state"] == "finished" else
                     f"<span class='sdl-warn'>stopped at step {esc(e['step'])} of {esc(e['total'])}</span>")
            date = esc(str(e.get("date", ""))[:16].replace("T", " "))
            body = (f"<b>{esc(e.get('title') or e.get('name'))}</b><div class='sdl-key'>{esc(e['key'])}</div>"
                    f"<div>{state} · {esc(e.get('base', ''))} · {date}</div>"
                    f"<div>trigger <code>{esc(e.get('trigger', ''))}</code> · rank {esc(e.get('rank', ''))} · "
                    f"{esc(e.get('steps', ''))} steps · {esc(e.get('images', ''))} images</div>"
                    + (f"<div class='sdl-compat'>{esc(e['compat'])}</div>" if e.get("compat") else ""))
        out.append(f"<div class='sdl-lib-card'>{_thumbnail(e.get('preview'))}<div class='sdl-lib-body'>{body}</div>"
                   "</div>")
    return f"<div class='sdl-lib-cards'>{''.join(out)}</div>"



# ---- the page ---------------------------------------------------------------------------------------------

def layout(ui):
    import gradio as gr
    lib = SimpleNamespace()
    gr.Markdown("Every run under `outputs/`, finished or stopped. Pick one below the cards to see its preview, "
                "compatibility and files, to resume or delete it.")
    with gr.Row():
        lib.family = gr.Dropdown(list(FAMILY_FILTERS), value=FAMILY_FILTERS[0], label="Base", elem_id="lib-family",
                                 min_width=140)
        lib.order = gr.Dropdown(list(ORDERS), value=ORDERS[0], label="Order", elem_id="lib-order", min_width=140)
        lib.refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100)
    lib.empty = gr.Markdown(elem_id="lib-empty")
    lib.cards = gr.HTML(elem_id="lib-cards")
    lib.pick = gr.Dropdown([], label="Selected run", allow_custom_value=True, elem_id="lib-pick")
    with gr.Row():
        lib.preview = gr.Image(label="Preview", interactive=False, height=200, elem_id="lib-preview", min_width=200)
        with gr.Column(scale=2, min_width=260):
            lib.state = gr.Markdown(elem_id="lib-state")
            with gr.Row():
                lib.open = gr.Button("Open in Generate", elem_id="lib-open")
                lib.resume = gr.Button("Resume", elem_id="lib-resume", visible=False)
                lib.ask_delete = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
            with gr.Row(visible=False) as lib.confirm_row:
                lib.confirm_text = gr.Markdown()
                lib.confirm = gr.Button("Yes, delete", variant="stop", elem_id="lib-confirm")
                lib.cancel = gr.Button("Cancel")
            lib.msg = gr.Markdown(elem_id="lib-msg")
            lib.compat = gr.Textbox(label="Compatibility: keys each tool loads (A1111, ComfyUI, diffusers)",
                                    interactive=False, lines=3, elem_id="lib-compat")
            lib.files = gr.File(label="Download (the LoRA and its sidecar files)", file_count="multiple",
                                interactive=False, elem_id="lib-files")
    lib.metadata = gr.JSON(label="Metadata", open=False)
    with gr.Accordion("Compare two LoRAs on one prompt and seed", open=False):
        with gr.Row():
            lib.cmp_a = gr.Dropdown([], label="LoRA A", elem_id="cmp-a")
            lib.cmp_b = gr.Dropdown([], label="LoRA B", elem_id="cmp-b")
        with gr.Row():
            lib.cmp_prompt = gr.Textbox(label="Prompt", scale=3, elem_id="cmp-prompt")
            lib.cmp_seed = gr.Number(1, label="Seed", precision=0, scale=1, elem_id="cmp-seed")
            lib.cmp_btn = gr.Button("Compare", scale=1, elem_id="cmp-btn")
        lib.cmp = gr.Gallery(label="Each at strength 1, same prompt and seed", columns=2, height=320,
                             object_fit="contain", elem_id="cmp")
    lib.outputs = [lib.cards, lib.empty, lib.pick, lib.confirm_row, lib.cmp_a, lib.cmp_b]
    return lib


def refreshed(ui, value=None, family=FAMILY_FILTERS[0], order=ORDERS[0]) -> list:
    """The cards, empty state, picker and compare lists as outputs/ is now; the pick is kept while it exists."""
    import gradio as gr
    cards, choices, empty = ui.library_view(family, order)
    keep = value if value in [c[1] for c in choices] else (choices[0][1] if choices else None)
    finished = [c for c in choices if c[1].endswith(".safetensors")]
    return [cards, gr.update(value=empty, visible=bool(empty)), gr.update(choices=choices, value=keep),
            gr.update(visible=False), gr.update(choices=finished, value=finished[0][1] if finished else None),
            gr.update(choices=finished, value=finished[1][1] if len(finished) > 1 else None)]


def wire(ui, lib, tabs) -> None:
    import gradio as gr

    from sdlora.webui.widgets import guarded
    view = [lib.pick, lib.family, lib.order]
    lib.refresh.click(lambda *v: refreshed(ui, *v), view, lib.outputs)
    lib.family.change(lambda *v: refreshed(ui, *v), view, lib.outputs)
    lib.order.change(lambda *v: refreshed(ui, *v), view, lib.outputs)
    tabs.select(lambda *v: refreshed(ui, *v), view, lib.outputs)

    def show(key):
        d = ui.details(key)
        return (d["preview"], d["state"], d["compat"], d["files"] or None, d["metadata"], gr.update(visible=False),
                gr.update(visible=d["stopped"]), gr.update(visible=bool(d["lora"])), "")
    lib.pick.change(show, lib.pick, [lib.preview, lib.state, lib.compat, lib.files, lib.metadata, lib.confirm_row,
                                     lib.resume, lib.open, lib.msg])
    lib.ask_delete.click(lambda p: (gr.update(visible=bool(p)), f"Delete **{html.escape(p or '')}** and its run "
                                    "folder (samples, checkpoints)? This cannot be undone."),
                         lib.pick, [lib.confirm_row, lib.confirm_text])
    lib.cancel.click(lambda: gr.update(visible=False), None, lib.confirm_row)
    lib.confirm.click(guarded(lambda p, f, o: [ui.delete(p), *refreshed(ui, None, f, o)]),
                      [lib.pick, lib.family, lib.order], [lib.msg, *lib.outputs])

    def resume(key):
        ui.resume(str(ui.library_path(key)))
        return gr.Tabs(selected="train"), "Resumed: follow it on the Train tab."
    lib.resume.click(guarded(resume), lib.pick, [tabs, lib.msg])
    lib.cmp_a.change(lambda k, text: ui.prompt_for(str(ui.library_path(k)) if k else None, text),
                     [lib.cmp_a, lib.cmp_prompt], lib.cmp_prompt)
    lib.cmp_btn.click(guarded(ui.compare), [lib.cmp_a, lib.cmp_b, lib.cmp_prompt, lib.cmp_seed], lib.cmp)


__all__ = ["LibraryMixin", "lora_info", "compat_summary", "compat_details", "layout", "wire", "refreshed",
           "cards_html", "base_family_title", "FAMILY_FILTERS", "ORDERS", "EMPTY"]
