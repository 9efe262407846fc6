"""The Train tab's page: images and their captions, the settings, Start / Stop / Resume, progress.

The settings' controls are made from their declarations in `sdlora.config` (`settings_controls`), so a
setting declared there appears here and in the CLI with the same default. The handlers are the
WebUI's (`images.ImagesMixin`, `jobs.RunsMixin`); this module only lays out and wires.
"""
from __future__ import annotations

import html
from types import SimpleNamespace

from sdlora.config import Setting
from sdlora.data.captioning import EXAMPLE_MODEL
from sdlora.webui.forms import TEMPLATES, default_form, train_controls
from sdlora.webui.images import notes_html
from sdlora.webui.results import loss_rows
from sdlora.webui.widgets import base_picker, guarded, told

PER_ROW = 5                  # advanced controls per row


def control(s: Setting, value):
    """The Gradio control of one declared setting, labelled and explained as declared."""
    import gradio as gr
    info = s.help
    if s.kind is bool:
        c = gr.Checkbox(bool(value), label=s.label, info=info)
    elif s.choices:
        c = gr.Dropdown(list(s.choices), value=value, label=s.label, info=info)
    elif as_text(s):
        # a Number box cannot be left empty (the page sends 0), and "unset" is a value of these settings
        c = gr.Textbox(shown_value(s, value), label=s.label, info=info, placeholder="unset")
    elif s.kind in (int, float):
        # no minimum here: the page would refuse a value with a toast that names no field; the setting's own
        # check names it (told() shows that message)
        c = gr.Number(value, label=s.label, info=info, precision=0 if s.kind is int else None)
    else:
        c = gr.Textbox(value, label=s.label, info=info)
    c.elem_id = f"f-{s.name}"
    return c


def as_text(s: Setting) -> bool:
    return s.kind in (int, float) and s.optional and not s.derived


def shown_value(s: Setting, value):
    """A setting's value as its control holds it (the optional numbers are text boxes: None is empty)."""
    return ("" if value is None else str(value)) if as_text(s) else value


def settings_controls(ui) -> tuple[dict, object]:
    """({setting name: control}, the base's note): the base picker, the basic settings in a row, the advanced ones
    in a closed accordion."""
    import gradio as gr
    values, controls = default_form(ui.base), {}
    shown = train_controls()
    entries = ui.bases()                    # the models folders, read once for the picker and its note
    with gr.Row():
        controls["base"] = base_picker(ui, ui.base, "f-base", entries)
        note = gr.Markdown(ui.base_note(ui.base, entries), elem_id="base-note")
    with gr.Row():
        for s in (s for s in shown if s.ui == "basic" and s.name != "base"):
            controls[s.name] = control(s, values[s.name])
    advanced = [s for s in shown if s.ui == "advanced"]
    with gr.Accordion("Advanced settings", open=False):
        for i in range(0, len(advanced), PER_ROW):
            with gr.Row():
                for s in advanced[i:i + PER_ROW]:
                    controls[s.name] = control(s, values[s.name])
    return controls, note


def gallery(ui, rev):
    """The image cards: the image as trained, its caption (editable), its notes."""
    import gradio as gr
    rows = ui.dataset.rows() if ui.dataset else []
    for i in range(0, len(rows), 2):
        with gr.Row():
            for row in rows[i:i + 2]:
                with gr.Row(elem_classes="sdl-card"):
                    if not row.usable:
                        gr.HTML(f'<div class="sdl-skipped">{html.escape(row.name)}</div>' + notes_html(row))
                        continue
                    gr.Image(row.preview, show_label=False, height=128, width=128, scale=0, min_width=130,
                             interactive=False, container=False, buttons=[])
                    with gr.Column(min_width=200):
                        box = gr.Textbox(row.caption, label=f"{row.name}: caption it trains with", lines=2,
                                         interactive=True, elem_classes="sdl-caption")
                        note = gr.HTML(notes_html(row))
                        save = guarded(lambda text, n=row.name: notes_html(ui.set_caption(n, text)))
                        box.blur(save, box, note, show_progress="hidden")
                        box.submit(save, box, note, show_progress="hidden")


def layout(ui, demo) -> SimpleNamespace:
    import gradio as gr
    t = SimpleNamespace(rev=gr.State(0), seen=gr.State([-2, ""]))
    gr.Markdown("### 1. Images and captions")
    with gr.Row():
        t.files = gr.File(label="Drop 5-20 images here or click to choose; a same-name .txt is the caption",
                          file_count="multiple", height=150, scale=3, elem_id="upload")
        with gr.Column(scale=2):
            examples = ui.examples()
            t.example = gr.Dropdown(examples, label="Or start from an example dataset",
                                    info="Folders in datasets/ (images + .txt captions)" if examples
                                    else "None found in datasets/", allow_custom_value=True,
                                    value=(examples or [None])[0], elem_id="example")
            t.example_btn = gr.Button("Load example dataset")
    with gr.Row():
        t.caption_model = gr.Textbox(label="Captioning model", placeholder=EXAMPLE_MODEL, scale=3,
                                     info="Writes a caption for each image without one, the trigger word in front: "
                                     "a hub id of a transformers image-to-text model (BLIP, GIT, ViT-GPT2, "
                                     "Florence-2; downloaded once) or a local folder of one", elem_id="caption-model")
        t.caption_overwrite = gr.Checkbox(False, label="Overwrite existing captions", scale=1,
                                          elem_id="caption-overwrite")
        t.caption_btn = gr.Button("Caption images", scale=1, elem_id="caption")
    t.summary = gr.Markdown("No images yet.", elem_id="ds-summary")
    with gr.Accordion("Edit all captions at once", open=False):
        with gr.Row():
            t.find = gr.Textbox(label="Find", elem_id="edit-find")
            t.replace = gr.Textbox(label="Replace with", elem_id="edit-replace")
            t.prefix = gr.Textbox(label="Add in front", info="joined with ', '; not added twice", elem_id="edit-prefix")
            t.suffix = gr.Textbox(label="Add at the end", info="joined with ', '; not added twice",
                                  elem_id="edit-suffix")
        t.edit_btn = gr.Button("Apply to every caption", elem_id="edit-apply")
    gr.render(inputs=t.rev, triggers=[t.rev.change, demo.load])(lambda rev: gallery(ui, rev))
    gr.Markdown("### 2. Settings")
    t.kind = gr.Radio(["style", "subject"], value="style", label="What the images share",
                      info="style: a look (colours, strokes); subject: one person or object")
    t.F, t.base_note = settings_controls(ui)
    gr.Markdown("### 3. Train")
    t.job_note = gr.Markdown(elem_id="job-note")
    with gr.Row(elem_id="train-actions"):          # on a phone: a bar at the bottom of the screen
        t.start = gr.Button("Start training", variant="primary", elem_id="start")
        t.stop = gr.Button("Stop", variant="stop", elem_id="stop", visible=False)
    with gr.Row():
        t.resume_run = gr.Dropdown([], label="Stopped run to resume", allow_custom_value=True, scale=2,
                                   info="Runs you stopped appear here; Resume continues at the exact step")
        t.resume = gr.Button("Resume", elem_id="resume")
    t.msg = gr.Markdown(elem_id="train-msg")
    t.progress = gr.HTML(elem_id="progress")
    t.loss = gr.LinePlot(loss_frame([]), x="step", y="loss", color="series", title="Training loss",
                         y_title="loss", color_map={"raw": "#cbd5e1", "smoothed": "#4338ca"}, height=280,
                         elem_id="loss-plot")
    t.sample = gr.Image(label="Samples: a row per seed; the base before training, then with and without the trigger "
                        "at the latest sample step", interactive=False, elem_id="samples", height="auto")
    t.sample_caption = gr.Markdown(elem_id="sample-caption")
    t.samples = gr.Gallery(label="Every sample step, newest first (click one to enlarge it)", columns=4, height=260,
                           object_fit="contain", elem_id="sample-history")
    t.result = gr.File(label="Your LoRA and its sidecar files", file_count="multiple", interactive=False,
                       visible=False, elem_id="result")
    t.open_gen = gr.Button("Open it in the Generate tab", visible=False, elem_id="open-gen")
    t.timer = gr.Timer(1.0)
    return t


def loss_frame(losses):
    """The chart's rows: every raw loss (faint) and the smoothed curve over them; None before the first step
    (a chart first drawn from an empty frame draws no lines when rows arrive later)."""
    import pandas as pd
    rows = loss_rows(losses)
    if not rows:
        return None
    return pd.DataFrame({"step": pd.Series([r[0] for r in rows], dtype="int64"),
                         "loss": pd.Series([r[1] for r in rows], dtype="float64"),
                         "series": pd.Series([r[2] for r in rows], dtype="str")})


DERIVED = ("steps", "rank", "lr", "sample_every")     # refilled when images arrive (training.plan.suggested)


def wire(ui, t: SimpleNamespace) -> None:
    import gradio as gr
    F = t.F
    derived = [F[name] for name in DERIVED]

    def with_defaults(rev, ds):
        s = ui.suggestions(len(ds.items))
        return [rev + 1, ds.summary(), *[s[name] for name in DERIVED]]

    def on_base(base):
        base = ui.pick_base(base)
        s = ui.suggestions(len(ui.dataset.items) if ui.dataset else 0, base)
        return [*[s[name] for name in DERIVED], s["resolution"], ui.base_note(base)]

    t.files.upload(guarded(lambda paths, rev, trig, tpl, res:
                           with_defaults(rev, ui.load_uploads(paths, trig, tpl, res))),
                   [t.files, t.rev, F["trigger"], F["template"], F["resolution"]], [t.rev, t.summary, *derived])
    t.files.clear(lambda rev: (ui.clear_dataset(), rev + 1, "No images yet.")[1:], t.rev, [t.rev, t.summary])

    def on_example(name, rev, tpl, res):
        ds, trigger = ui.load_example(name, tpl, res)
        return [*with_defaults(rev, ds), trigger]
    t.example_btn.click(guarded(on_example), [t.example, t.rev, F["template"], F["resolution"]],
                        [t.rev, t.summary, *derived, F["trigger"]])

    def on_caption(model, overwrite, trigger, rev):
        report = ui.caption_images(model, overwrite, trigger)
        failed = [f"Not captioned: {r.path.name}: {r.reason}" for r in report.of("failed")]
        lines = [f"Captions: {len(report.of('written'))} written, {len(report.of('kept'))} kept"
                 f"{', ' + str(len(failed)) + ' failed' if failed else ''}; check and edit them below.", *failed]
        return rev + 1, ui.dataset.summary() + "\n\n" + "\n\n".join(html.escape(x, quote=False) for x in lines)
    t.caption_btn.click(guarded(on_caption), [t.caption_model, t.caption_overwrite, F["trigger"], t.rev],
                        [t.rev, t.summary])

    def on_rescan(rev, trigger, tpl, res, buckets):
        ds = ui.rescan(trigger, tpl, res, buckets)
        return (rev + 1, ds.summary()) if ds else (gr.skip(), gr.skip())
    rescan_inputs = [t.rev, F["trigger"], F["template"], F["resolution"], F["buckets"]]
    for comp in (F["trigger"], F["template"], F["resolution"]):
        comp.blur(guarded(on_rescan), rescan_inputs, [t.rev, t.summary])
        comp.submit(guarded(on_rescan), rescan_inputs, [t.rev, t.summary])
    F["buckets"].change(guarded(on_rescan), rescan_inputs, [t.rev, t.summary])
    F["base"].change(guarded(on_base), F["base"], [*derived, F["resolution"], t.base_note]).then(
        guarded(on_rescan), rescan_inputs, [t.rev, t.summary])
    t.edit_btn.click(guarded(lambda rev, *edit: (rev + 1, ui.edit_captions(*edit))),
                     [t.rev, t.find, t.replace, t.prefix, t.suffix], [t.rev, t.summary])
    t.kind.change(lambda k: TEMPLATES[k], t.kind, F["template"]).then(guarded(on_rescan), rescan_inputs,
                                                                      [t.rev, t.summary])
    t.start.click(told(lambda *v: (ui.start(dict(zip(F, v, strict=True))), "Training started.")[1]),
                  list(F.values()), t.msg)
    t.stop.click(ui.stop, None, t.msg)
    t.resume.click(told(lambda run: (ui.resume(run), "Resuming from the last checkpoint.")[1]), t.resume_run, t.msg)
    t.timer.tick(lambda seen: on_tick(ui, seen, list(F)), t.seen,
                 [t.seen, t.progress, t.loss, t.sample, t.sample_caption, t.samples, t.result, t.open_gen,
                  t.resume_run, t.msg, t.start, t.stop, t.resume, t.job_note, *F.values()], show_progress="hidden")


JOB_NOTE = ("**A training is running**: the settings below are that run's (read-only). They can be changed "
            "again when it stops or ends.")


def on_tick(ui, seen, names: list[str]):
    """The progress, loss plot, samples and result as they are now; nothing is sent when nothing changed.

    The job is the source of truth: while one runs, every page (a reloaded one, a second tab) shows its settings,
    read-only, and Stop in place of Start."""
    import gradio as gr
    p = ui.progress()
    state = ui.job.state if ui.job else ""
    if [p["rev"], state] == seen:
        return [gr.skip()] * (14 + len(names))
    runs, changed = ui.resumable_runs(), state != seen[1]
    resumable = gr.update(choices=runs, value=runs[0][1] if runs else None) if changed else gr.skip()
    finished = changed and state in ("done", "stopped", "failed")          # the old message is stale
    files = gr.update(value=p["files"] or None, visible=bool(p["files"]))
    alive, settings = p["alive"], p["settings"]
    if changed:
        declared = {s.name: s for s in train_controls()}
        buttons = [gr.update(visible=not alive), gr.update(visible=alive), gr.update(interactive=not alive),
                   JOB_NOTE if alive else ""]
        fields = [gr.update(value=shown_value(declared[n], settings[n]), interactive=False) if alive and settings
                  else gr.update(interactive=True) for n in names]
    else:
        buttons, fields = [gr.skip()] * 4, [gr.skip()] * len(names)
    newest, caption = p["samples"][0] if p["samples"] else (None, "")
    return [[p["rev"], state], p["html"], loss_frame(p["losses"]), newest, html.escape(caption, quote=False),
            p["samples"], files,
            gr.update(visible=bool(p["lora"])), resumable, "" if finished else gr.skip(), *buttons, *fields]


__all__ = ["layout", "wire", "settings_controls", "control"]
