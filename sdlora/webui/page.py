"""The whole page: three tabs (Train, Generate, Library) and what links them.

Each tab lays itself out and wires its own handlers (`train_tab`, `generate_tab`, `library_tab`); this
module joins them: "Open it in Generate" from Train and Library, and what a reloaded page shows.
"""
from __future__ import annotations

from sdlora.webui import generate_tab, library_tab, train_tab
from sdlora.webui.widgets import INTRO


def build(ui):
    """The Gradio Blocks of the web UI for one server-side `WebUI`."""
    import gradio as gr
    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("# sdlora: style LoRA trainer\n" + INTRO)
        with gr.Tabs() as tabs:
            with gr.Tab("Train", id="train"):
                t = train_tab.layout(ui, demo)
            with gr.Tab("Generate", id="generate"):
                g = generate_tab.layout(ui)
            with gr.Tab("Library", id="library"):
                lib = library_tab.layout(ui)
        train_tab.wire(ui, t)
        generate_tab.wire(ui, g, tabs)
        library_tab.wire(ui, lib, tabs)
        targets = [tabs, g.slots[0][0], g.prompt]
        t.open_gen.click(lambda text: generate_tab.open_in_generate(ui, ui.progress()["lora"], text), g.prompt,
                         targets)
        lib.open.click(lambda key, text: generate_tab.open_in_generate(ui, str(ui.library_path(key)), text),
                       [lib.pick, g.prompt],
                       targets)

        def on_load():
            ds, runs, entries = ui.dataset, ui.resumable_runs(), ui.bases()
            bases = ui.base_choices(entries)
            return [ds.summary() if ds else "No images yet.", ds.trigger if ds else gr.skip(),
                    gr.update(choices=runs, value=runs[0][1] if runs else None), gr.update(choices=ui.examples()),
                    gr.update(choices=bases, value=ui.base), gr.update(choices=bases), ui.base_note(ui.base, entries),
                    *generate_tab.lora_lists(ui, g), *library_tab.refreshed(ui)]
        demo.load(on_load, None, [t.summary, t.F["trigger"], t.resume_run, t.example, t.F["base"], g.base,
                                  t.base_note, *[s[0] for s in g.slots], *lib.outputs])
    return demo


__all__ = ["build"]
