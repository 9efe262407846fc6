"""The Library tab: every LoRA under outputs/ with its metadata, preview, key check, download and delete."""

import html
import json
from pathlib import Path
from types import SimpleNamespace

from sdlora.runs import compat_path, delete_lora, lora_files, lora_with_sidecars, preview_path
from sdlora.webui.forms import UserError


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
        files = lora_with_sidecars(p)
        meta = {k: v for k, v in info.items() if k not in ("preview", "compat", "name")}
        return {"preview": info["preview"], "metadata": meta, "files": [str(f) for f in files],
                "compat": compat_details(compat_path(p.parent))}

    def delete(self, path: str) -> str:
        p = Path(path or "")
        if not path or p.resolve() not in {q.resolve() for q in lora_files(self.outputs)}:
            raise UserError("Pick a LoRA from the library to delete.")
        job = self.job
        if job is not None and job.alive() and job.run_dir and p.parent.resolve() == Path(job.run_dir).resolve():
            raise UserError("This run is training right now; stop it first.")
        return delete_lora(p, self.outputs)



# ---- the page ---------------------------------------------------------------------------------------------

def layout(ui):
    import gradio as gr
    lib = SimpleNamespace()
    gr.Markdown("Every LoRA under `outputs/`. Click a preview or a table row to select it; its preview, "
                "compatibility, download and delete are below the table.")
    with gr.Row():
        lib.refresh = gr.Button("Refresh", size="sm", scale=0, min_width=120)
    lib.previews = gr.Gallery(label="Previews (click one to select it)", columns=8, height=170, preview=False,
                              allow_preview=False, fit_columns=False, elem_id="lib-gallery")
    lib.table = gr.Dataframe(headers=["file", "title", "base", "rank", "alpha", "trigger", "steps", "images", "date",
                                      "compatibility"], datatype="str", interactive=False, wrap=True, max_chars=60,
                             column_widths=["16%", "16%", "7%", "5%", "6%", "9%", "6%", "6%", "11%", "18%"],
                             elem_id="lib-table")
    lib.pick = gr.Dropdown([], label="Selected LoRA", allow_custom_value=True, elem_id="lib-pick")
    with gr.Row():
        lib.preview = gr.Image(label="Preview", interactive=False, height=200, elem_id="lib-preview")
        with gr.Column(scale=2):
            lib.compat = gr.Textbox(label="Compatibility: keys each tool loads (A1111, ComfyUI, diffusers)",
                                    interactive=False, lines=3)
            lib.files = gr.File(label="Download (the LoRA and its sidecar files)", file_count="multiple",
                                interactive=False, elem_id="lib-files")
            with gr.Row():
                lib.open = gr.Button("Open in Generate")
                lib.ask_delete = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
            with gr.Row(visible=False) as lib.confirm_row:
                lib.confirm_text = gr.Markdown()
                lib.confirm = gr.Button("Yes, delete", variant="stop", elem_id="lib-confirm")
                lib.cancel = gr.Button("Cancel")
    lib.metadata = gr.JSON(label="Metadata", open=False)
    lib.msg = gr.Markdown()
    lib.outputs = [lib.previews, lib.table, lib.pick, lib.confirm_row]
    return lib


def refreshed(ui, value=None) -> list:
    """The gallery, table and picker as the outputs folder is now; the pick is kept while it exists."""
    import gradio as gr
    gallery, rows, choices = ui.library_view()
    keep = value if value in [c[1] for c in choices] else (choices[0][1] if choices else None)
    return [gallery, rows, gr.update(choices=choices, value=keep), gr.update(visible=False)]


def wire(ui, lib, tabs) -> None:
    import gradio as gr

    from sdlora.webui.widgets import guarded
    lib.refresh.click(lambda v: refreshed(ui, v), lib.pick, lib.outputs)
    tabs.select(lambda v: refreshed(ui, v), lib.pick, lib.outputs)

    def row_picked(evt: gr.SelectData):
        return str(ui.outputs / evt.row_value[0]) if evt.row_value else gr.skip()

    def preview_picked(evt: gr.SelectData):
        caption = (evt.value or {}).get("caption")
        return next((i["file"] for i in ui.library() if i["name"] == caption), gr.skip())
    lib.table.select(row_picked, None, lib.pick)
    lib.previews.select(preview_picked, None, lib.pick)

    def show(path):
        d = ui.details(path)
        return d["preview"], d["compat"], d["files"] or None, d["metadata"], gr.update(visible=False)
    lib.pick.change(show, lib.pick, [lib.preview, lib.compat, lib.files, lib.metadata, lib.confirm_row])
    lib.ask_delete.click(lambda p: (gr.update(visible=bool(p)), f"Delete **{html.escape(Path(p or '').name)}** and its "
                                    "run folder (samples, checkpoints)? This cannot be undone."),
                         lib.pick, [lib.confirm_row, lib.confirm_text])
    lib.cancel.click(lambda: gr.update(visible=False), None, lib.confirm_row)
    lib.confirm.click(guarded(lambda p: [ui.delete(p), *refreshed(ui)]), lib.pick, [lib.msg, *lib.outputs])


__all__ = ["LibraryMixin", "lora_info", "compat_summary", "compat_details", "layout", "wire", "refreshed"]
