"""What every tab's page shares: the style sheet, the texts, and handlers that turn a UserError into a notice.

Gradio is imported inside the functions, so the web UI's logic can be imported (and tested) without it.
"""
from __future__ import annotations

import functools
import html

CSS = """
.sdl-bar {height: 14px; background: var(--neutral-200); border-radius: 7px; overflow: hidden}
.sdl-fill {height: 100%; background: var(--color-accent); transition: width .4s}
.sdl-text {margin-top: 6px; font-weight: 600}
.sdl-msg {font-size: 0.85em; color: var(--body-text-color-subdued); white-space: pre-line}
.sdl-notes {margin: 0; padding-left: 1.1em; font-size: 0.9em}
.sdl-warn {color: #a16207} .sdl-fatal {color: #b91c1c; font-weight: 600}
.sdl-card {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 6px}
.sdl-card img, #gen-image img, #lib-preview img {image-rendering: pixelated; width: 100%; height: 100%;
                                                 object-fit: contain}
.sdl-skipped {font-weight: 600; margin: 4px 0}
.sdl-lib-cards {display: flex; flex-wrap: wrap; gap: 10px}
.sdl-lib-card {display: flex; gap: 10px; flex: 1 1 300px; max-width: 520px; min-width: 0; padding: 8px;
               border: 1px solid var(--border-color-primary); border-radius: 8px}
.sdl-thumb {width: 96px; height: 96px; flex: none; object-fit: contain; image-rendering: pixelated}
.sdl-nothumb {display: flex; align-items: center; justify-content: center; font-size: 0.8em;
              background: var(--neutral-100); color: var(--body-text-color-subdued)}
.sdl-lib-body {min-width: 0; overflow-wrap: anywhere; font-size: 0.9em; line-height: 1.45}
.sdl-key {color: var(--body-text-color-subdued); font-size: 0.9em}
.sdl-done {color: #15803d; font-weight: 600}
#samples img {image-rendering: pixelated}
#result button[aria-label="Remove this file"], #lib-files button[aria-label="Remove this file"] {display: none}
@media (max-width: 640px) {
  #train-actions {position: fixed; left: 0; right: 0; bottom: 0; z-index: 50; margin: 0; padding: 8px 12px;
                  background: var(--background-fill-primary); box-shadow: 0 -2px 8px rgba(0, 0, 0, .12)}
  .gradio-container {padding-bottom: 72px !important}
  #upload .wrap {font-size: 0.85em}
}
"""
INTRO = ("Train a **style LoRA** from 5-20 images: **1.** add images and check each caption, "
         "**2.** pick a trigger word, **3.** press Start. Then try it in **Generate**; every LoRA you made "
         "is in **Library**.")


def base_picker(ui, value: str, elem_id: str, entries=None):
    """The base picker of the Train and Generate tabs: every base found (`entries`, if already read), and a path
    or hub id may be typed."""
    import gradio as gr
    return gr.Dropdown(ui.base_choices(entries), value=value, label="Base model", allow_custom_value=True,
                       info="The built-in base and the checkpoints in the models folders (app.py --models-dir); "
                            "or type a .safetensors path, a diffusers folder or a hub id", elem_id=elem_id)


def guarded(fn):
    """Show a UserError as an error notice in the page instead of a traceback."""
    import gradio as gr

    from sdlora.webui.forms import UserError

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def told(fn):
    """Like guarded, for handlers whose output is a message: a warning notice plus the message in the page."""
    import gradio as gr

    from sdlora.webui.forms import UserError

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            gr.Warning(str(e))
            return f"**Not started:** {html.escape(str(e), quote=False)}"
    return wrapper


__all__ = ["CSS", "INTRO", "base_picker", "guarded", "told"]
