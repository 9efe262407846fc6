"""sdlora web UI: train a style LoRA, try it, keep a library of them.

    python app.py [--host H] [--port P] [--share] [--base tiny] [--outputs outputs] [--auth user:pass]

Layout and wiring only; the logic is in `sdlora.webui` (plain functions, tested without a browser).
"""

import argparse
import atexit
import functools
import html
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent
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
"""
BASE_INFO = "'tiny' (built in), a diffusers folder, a .safetensors checkpoint path, or a hub id"
INTRO = ("Train a **style LoRA** from 5-20 images: **1.** add images and check each caption, "
         "**2.** pick a trigger word, **3.** press Start. Then try it in **Generate**; every LoRA you made "
         "is in **Library**.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sdlora web UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (prints a warning)")
    p.add_argument("--base", default="tiny", help="base model: " + BASE_INFO)
    p.add_argument("--outputs", default="outputs", help="folder for runs and LoRA files")
    p.add_argument("--auth", default=None, help="require a login, user:pass (or set SDLORA_AUTH)")
    return p.parse_args(argv)


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise SystemExit("app.py: error: --auth / SDLORA_AUTH must be user:pass")
    return user, password


def guarded(fn):
    """Show a UserError as an error notice in the page instead of a traceback."""
    import gradio as gr
    from sdlora.webui.state import UserError

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
    from sdlora.webui.state import UserError

    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except UserError as e:
            gr.Warning(str(e))
            return f"**Not started:** {html.escape(str(e), quote=False)}"
    return wrapper


def build(ui):
    import gradio as gr
    import pandas as pd
    from sdlora.config import TrainConfig
    from sdlora.webui.state import TEMPLATES, native_resolution, notes_html, suggest

    def loss_frame(losses):
        return pd.DataFrame({"step": pd.Series([s for s, _ in losses], dtype="int64"),
                             "loss": pd.Series([v for _, v in losses], dtype="float64")})

    with gr.Blocks(title="sdlora") as demo:
        gr.Markdown("# sdlora: style LoRA trainer\n" + INTRO)
        ds_rev = gr.State(0)
        last = gr.State([-2, ""])
        with gr.Tabs() as tabs:
            # ---------------------------------------------------------------- Train
            with gr.Tab("Train", id="train"):
                gr.Markdown("### 1. Images and captions")
                with gr.Row():
                    files = gr.File(label="Drop 5-20 images here or click to choose; a same-name .txt is the caption",
                                    file_count="multiple", height=150, scale=3, elem_id="upload")
                    with gr.Column(scale=2):
                        example = gr.Dropdown(ui.examples(), label="Or start from an example dataset",
                                              info="Folders in datasets/ (images + .txt captions)" if ui.examples()
                                              else "None found in datasets/", allow_custom_value=True,
                                              value=(ui.examples() or [None])[0], elem_id="example")
                        example_btn = gr.Button("Load example dataset")
                summary = gr.Markdown("No images yet.", elem_id="ds-summary")

                @gr.render(inputs=ds_rev, triggers=[ds_rev.change, demo.load])
                def gallery(_rev):
                    rows = ui.dataset.rows() if ui.dataset else []
                    for i in range(0, len(rows), 2):
                        with gr.Row():
                            for row in rows[i:i + 2]:
                                with gr.Row(elem_classes="sdl-card"):
                                    if not row.usable:
                                        name = html.escape(row.name)
                                        gr.HTML(f'<div class="sdl-skipped">{name}</div>' + notes_html(row))
                                        continue
                                    gr.Image(row.preview, show_label=False, height=128, width=128, scale=0,
                                             min_width=130, interactive=False, container=False, buttons=[])
                                    with gr.Column(min_width=200):
                                        box = gr.Textbox(row.caption, label=f"{row.name}: caption it trains with",
                                                         lines=2, interactive=True, elem_classes="sdl-caption")
                                        note = gr.HTML(notes_html(row))
                                        save = guarded(lambda text, n=row.name: notes_html(ui.set_caption(n, text)))
                                        box.blur(save, box, note, show_progress="hidden")
                                        box.submit(save, box, note, show_progress="hidden")

                gr.Markdown("### 2. Settings")
                F = {}
                with gr.Row():
                    F["trigger"] = gr.Textbox("sks", label="Trigger word", info="A rare word that calls up the "
                                              "style in prompts, e.g. sks or neonstyle; it is added to every caption")
                    kind = gr.Radio(["style", "subject"], value="style", label="What the images share",
                                    info="style: a look (colours, strokes); subject: one person or object")
                with gr.Row():
                    F["steps"] = gr.Number(suggest(0)["steps"], label="Steps", precision=0, minimum=1,
                                           info="How long it trains; default 100 per image (400-2000)")
                    F["rank"] = gr.Number(8, label="Rank", precision=0, minimum=1, info="Size of the update: "
                                          "higher learns more detail, file grows (4-16 for a style)")
                    F["lr"] = gr.Number(suggest(0, ui.base)["lr"], label="Learning rate",
                                        info="empty: the base's recommendation (1e-3 for tiny, else 1e-4); "
                                             "higher learns faster, can overshoot")
                    F["resolution"] = gr.Number(native_resolution(ui.base), label="Resolution (px)", precision=0,
                                                info="Images are cropped to this square; default: the base's size")
                    F["text_encoder"] = gr.Checkbox(False, label="Train text encoder",
                                                    info="Learns the trigger word better; larger file")
                with gr.Accordion("Advanced settings", open=False):
                    with gr.Row():
                        F["alpha"] = gr.Number(0, label="Alpha",
                                               info="Update scaled by alpha / rank; 0 = same as rank (scale 1)")
                        F["template"] = gr.Textbox(TEMPLATES["style"], label="Caption for images without a .txt",
                                                   info="{trigger} is replaced by the trigger word")
                        F["base"] = gr.Textbox(ui.base, label="Base model", info=BASE_INFO)
                        F["run_name"] = gr.Textbox("", label="Run name",
                                                   info="Folder and file name; default: the trigger")
                    with gr.Row():
                        F["sample_every"] = gr.Number(suggest(0)["sample_every"], label="Samples every N steps",
                                                      precision=0, minimum=0, info="0 = none")
                        F["checkpoint_every"] = gr.Number(0, label="Checkpoint every N steps", precision=0, minimum=0,
                                                          info="0 = only when stopped and at the end")
                        F["seed"] = gr.Number(0, label="Seed", precision=0, minimum=0)
                        F["batch_size"] = gr.Number(1, label="Batch size", precision=0, minimum=1)
                        F["grad_accum"] = gr.Number(1, label="Gradient accumulation", precision=0, minimum=1)
                    with gr.Row():
                        F["schedule"] = gr.Dropdown(["constant", "cosine"], value="constant", label="LR schedule")
                        F["warmup_steps"] = gr.Number(0, label="Warmup steps", precision=0, minimum=0)
                        F["dropout"] = gr.Number(0.0, label="LoRA dropout")
                        F["noise_offset"] = gr.Number(0.0, label="Noise offset")
                        F["min_snr_gamma"] = gr.Number(0, label="Min-SNR gamma", info="0 = off; 5 is usual")
                        F["trigger_isolation"] = gr.Number(
                            TrainConfig.trigger_isolation, label="Trigger isolation", minimum=0,
                            info="keeps prompts without the trigger as the base draws them; 0 = off")
                    with gr.Row():
                        F["mixed_precision"] = gr.Dropdown(["no", "bf16", "fp16"], value="no", label="Mixed precision")
                        F["save_format"] = gr.Dropdown(["kohya", "diffusers"], value="kohya", label="File format",
                                                       info="kohya loads in A1111, ComfyUI and diffusers")
                        F["save_dtype"] = gr.Dropdown(["fp16", "bf16", "fp32"], value="fp16", label="Saved precision")
                        F["flip"] = gr.Checkbox(False, label="Random horizontal flip")
                        F["self_attention"] = gr.Checkbox(False, label="Also adapt self-attention")
                        F["use_dora"] = gr.Checkbox(False, label="DoRA")
                        F["use_rslora"] = gr.Checkbox(False, label="rsLoRA")

                for key, comp in F.items():
                    comp.elem_id = f"f-{key}"
                gr.Markdown("### 3. Train")
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="start")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    resume_run = gr.Dropdown([], label="Stopped run to resume", allow_custom_value=True, scale=2,
                                             info="Runs you stopped appear here; Resume continues at the exact step")
                    resume = gr.Button("Resume", elem_id="resume")
                train_msg = gr.Markdown(elem_id="train-msg")
                progress = gr.HTML(elem_id="progress")
                with gr.Row():
                    loss = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=260)
                    samples = gr.Gallery(label="Samples at fixed seeds, with and without the trigger (newest first)",
                                         columns=2, height=300, fit_columns=False, elem_id="samples")
                result = gr.File(label="Your LoRA and its sidecar files", file_count="multiple", interactive=False,
                                 visible=False, elem_id="result")
                open_gen = gr.Button("Open it in the Generate tab", visible=False, elem_id="open-gen")
                timer = gr.Timer(1.0)

            # ---------------------------------------------------------------- Generate
            with gr.Tab("Generate", id="generate"):
                gr.Markdown("Pick a LoRA (train one in **Train**, or upload a `.safetensors`), check the prompt, press "
                            "**Generate**. Moving a strength slider never reloads the base model.")
                g_base = gr.Textbox(ui.base, label="Base model", info=BASE_INFO)
                slots = []
                for i in range(3):
                    with gr.Accordion(f"LoRA {i + 1}", open=i == 0):
                        with gr.Row():
                            path = gr.Dropdown([], label="LoRA file (from outputs/ or uploaded)", scale=3,
                                               allow_custom_value=True, elem_id=f"lora{i + 1}")
                            strength = gr.Slider(-1, 2, value=1.0, step=0.05, label="Strength", scale=2,
                                                 elem_id=f"strength{i + 1}")
                        with gr.Accordion("Advanced: separate U-Net and text-encoder strengths", open=False):
                            with gr.Row():
                                separate = gr.Checkbox(False, label="Use a separate text-encoder strength")
                                te = gr.Slider(-1, 2, value=1.0, step=0.05, label="Text-encoder strength")
                        if i == 0:
                            upload_lora = gr.UploadButton("Upload a .safetensors LoRA from elsewhere",
                                                          file_types=[".safetensors"], size="sm")
                    slots.append((path, strength, separate, te))
                    if i == 0:
                        gr.Markdown("**Mix LoRAs:** open *LoRA 2* and *LoRA 3* below and pick a file in each.")
                prompt = gr.Textbox("", label="Prompt", info="Filled with the LoRA's trigger word when you pick one",
                                    elem_id="prompt")
                negative = gr.Textbox("", label="Negative prompt")
                with gr.Row():
                    G = {"seed": gr.Number(1, label="Seed", precision=0, minimum=0),
                         "steps": gr.Number(20, label="Steps", precision=0, minimum=1),
                         "guidance": gr.Number(7.5, label="Guidance"),
                         "width": gr.Number(native_resolution(ui.base), label="Width", precision=0, step=8),
                         "height": gr.Number(native_resolution(ui.base), label="Height", precision=0, step=8)}
                for key, comp in G.items():
                    comp.elem_id = f"g-{key}"
                with gr.Row():
                    gen_btn = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    sweep_btn = gr.Button("Strength sweep (LoRA 1 at 0 to 1)", elem_id="sweep-btn")
                image = gr.Image(label="Result", interactive=False, height=320, elem_id="gen-image")
                gen_info = gr.Markdown(elem_id="gen-info")
                sweep = gr.Gallery(label="Strength sweep: same prompt and seed, LoRA 1 at these strengths",
                                   columns=5, rows=1, height=280, object_fit="contain", elem_id="sweep")

            # ---------------------------------------------------------------- Library
            with gr.Tab("Library", id="library"):
                gr.Markdown("Every LoRA under `outputs/`. Click a preview or a table row to select it; its preview, "
                            "compatibility, download and delete are below the table.")
                with gr.Row():
                    refresh = gr.Button("Refresh", size="sm", scale=0, min_width=120)
                previews = gr.Gallery(label="Previews (click one to select it)", columns=8, height=170, preview=False,
                                      allow_preview=False, fit_columns=False, elem_id="lib-gallery")
                table = gr.Dataframe(headers=["file", "title", "base", "rank", "alpha", "trigger", "steps", "images",
                                              "date", "compatibility"], datatype="str", interactive=False, wrap=True,
                                     max_chars=60,
                                     column_widths=["16%", "16%", "7%", "5%", "6%", "9%", "6%", "6%", "11%", "18%"],
                                     elem_id="lib-table")
                pick = gr.Dropdown([], label="Selected LoRA", allow_custom_value=True, elem_id="lib-pick")
                with gr.Row():
                    lib_preview = gr.Image(label="Preview", interactive=False, height=200, elem_id="lib-preview")
                    with gr.Column(scale=2):
                        compat = gr.Textbox(label="Compatibility: keys each tool loads (A1111, ComfyUI, diffusers)",
                                            interactive=False, lines=3)
                        lib_files = gr.File(label="Download (the LoRA and its sidecar files)", file_count="multiple",
                                            interactive=False, elem_id="lib-files")
                        with gr.Row():
                            lib_open = gr.Button("Open in Generate")
                            ask_delete = gr.Button("Delete…", variant="stop", elem_id="lib-delete")
                        with gr.Row(visible=False) as confirm_row:
                            confirm_text = gr.Markdown()
                            confirm = gr.Button("Yes, delete", variant="stop", elem_id="lib-confirm")
                            cancel = gr.Button("Cancel")
                metadata = gr.JSON(label="Metadata", open=False)
                lib_msg = gr.Markdown()

        # ---------------------------------------------------------------- wiring
        dataset_defaults = [F["steps"], F["rank"], F["lr"], F["sample_every"], F["text_encoder"]]

        def with_defaults(rev, ds):
            s = suggest(len(ds.items), ui.base)
            return [rev + 1, ds.summary(), s["steps"], s["rank"], s["lr"], s["sample_every"], s["text_encoder"]]

        files.upload(guarded(lambda paths, rev, t, tpl, res: with_defaults(rev, ui.load_uploads(paths, t, tpl, res))),
                     [files, ds_rev, F["trigger"], F["template"], F["resolution"]],
                     [ds_rev, summary, *dataset_defaults])

        files.clear(lambda rev: (ui.clear_dataset(), rev + 1, "No images yet.")[1:], ds_rev, [ds_rev, summary])

        def on_example(name, rev, tpl, res):
            ds, trigger = ui.load_example(name, tpl, res)
            return [*with_defaults(rev, ds), trigger]
        example_btn.click(guarded(on_example), [example, ds_rev, F["template"], F["resolution"]],
                          [ds_rev, summary, *dataset_defaults, F["trigger"]])

        def on_rescan(rev, trigger, tpl, res):
            ds = ui.rescan(trigger, tpl, res)
            return (rev + 1, ds.summary()) if ds else (gr.skip(), gr.skip())
        rescan_inputs = [ds_rev, F["trigger"], F["template"], F["resolution"]]
        for comp in (F["trigger"], F["template"], F["resolution"]):
            comp.blur(guarded(on_rescan), rescan_inputs, [ds_rev, summary])
            comp.submit(guarded(on_rescan), rescan_inputs, [ds_rev, summary])
        kind.change(lambda k: TEMPLATES[k], kind, F["template"]).then(
            guarded(on_rescan), rescan_inputs, [ds_rev, summary])

        start.click(told(lambda *v: (ui.start(dict(zip(F, v, strict=True))), "Training started.")[1]),
                    list(F.values()), train_msg)
        stop.click(ui.stop, None, train_msg)
        resume.click(told(lambda run: (ui.resume(run), "Resuming from the last checkpoint.")[1]), resume_run, train_msg)

        def on_tick(seen):
            p = ui.progress()
            state = ui.job.state if ui.job else ""
            if [p["rev"], state] == seen:
                return [gr.skip()] * 8
            runs, changed = ui.resumable_runs(), state != seen[1]
            resumable = gr.update(choices=runs, value=runs[0][1] if runs else None) if changed else gr.skip()
            finished = changed and state in ("done", "stopped", "failed")          # the old message is stale
            files = gr.update(value=p["files"] or None, visible=bool(p["files"]))
            return [[p["rev"], state], p["html"], loss_frame(p["losses"]), p["samples"], files,
                    gr.update(visible=bool(p["lora"])), resumable, "" if finished else gr.skip()]
        timer.tick(on_tick, last, [last, progress, loss, samples, result, open_gen, resume_run, train_msg],
                   show_progress="hidden")

        lora_dd = slots[0][0]

        def open_in_generate(path, text):
            choices = gr.update(choices=ui.lora_choices(), value=path)
            return gr.Tabs(selected="generate"), choices, ui.prompt_for(path, text)
        open_gen.click(lambda text: open_in_generate(ui.progress()["lora"], text), prompt, [tabs, lora_dd, prompt])
        lora_dd.change(ui.prompt_for, [lora_dd, prompt], prompt)
        upload_lora.upload(guarded(lambda f, text: open_in_generate(ui.add_lora_upload(f), text)[1:]),
                           [upload_lora, prompt], [lora_dd, prompt])
        flat = [c for slot in slots for c in slot]
        gen_inputs = [g_base, prompt, negative, *G.values(), *flat]

        def unpack(base, pr, neg, *rest):
            gen = dict(zip(["prompt", "negative_prompt", *G], [pr, neg, *rest[:len(G)]]))
            vals = rest[len(G):]
            return base, [tuple(vals[i:i + 4]) for i in range(0, len(vals), 4)], gen
        gen_btn.click(guarded(lambda *v: ui.generate(*unpack(*v))), gen_inputs, [image, gen_info])
        sweep_btn.click(guarded(lambda *v: ui.sweep(*unpack(*v))), gen_inputs, sweep)

        def lora_lists():
            choices = ui.lora_choices()
            return [gr.update(choices=choices) for _ in slots]
        tabs.select(lora_lists, None, [s[0] for s in slots])

        def library(value=None):
            gallery, rows, choices = ui.library_view()
            keep = value if value in [c[1] for c in choices] else (choices[0][1] if choices else None)
            return gallery, rows, gr.update(choices=choices, value=keep), gr.update(visible=False)
        lib_outputs = [previews, table, pick, confirm_row]
        refresh.click(library, pick, lib_outputs)
        tabs.select(library, pick, lib_outputs)

        def row_picked(evt: gr.SelectData):
            return str(ui.outputs / evt.row_value[0]) if evt.row_value else gr.skip()

        def preview_picked(evt: gr.SelectData):
            caption = (evt.value or {}).get("caption")
            return next((i["file"] for i in ui.library() if i["name"] == caption), gr.skip())
        table.select(row_picked, None, pick)
        previews.select(preview_picked, None, pick)

        def show(path):
            d = ui.details(path)
            return d["preview"], d["compat"], d["files"] or None, d["metadata"], gr.update(visible=False)
        pick.change(show, pick, [lib_preview, compat, lib_files, metadata, confirm_row])
        ask_delete.click(lambda p: (gr.update(visible=bool(p)), f"Delete **{html.escape(Path(p or '').name)}** and "
                                    "its run folder (samples, checkpoints)? This cannot be undone."),
                         pick, [confirm_row, confirm_text])
        cancel.click(lambda: gr.update(visible=False), None, confirm_row)
        confirm.click(guarded(lambda p: [ui.delete(p), *library()]), pick, [lib_msg, *lib_outputs])
        lib_open.click(open_in_generate, [pick, prompt], [tabs, lora_dd, prompt])

        def on_load():
            ds = ui.dataset
            runs = ui.resumable_runs()
            return [ds.summary() if ds else "No images yet.", ds.trigger if ds else gr.skip(),
                    gr.update(choices=runs, value=runs[0][1] if runs else None), gr.update(choices=ui.examples()),
                    *lora_lists(), *library()]
        demo.load(on_load, None, [summary, F["trigger"], resume_run, example, *[s[0] for s in slots], *lib_outputs])
    return demo


def main(argv=None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth or os.environ.get("SDLORA_AUTH"))
    upload_dir = tempfile.mkdtemp(prefix="sdlora-uploads-")      # Gradio's uploads and result copies go here
    atexit.register(shutil.rmtree, upload_dir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))         # so the temporary folder is removed then too
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from sdlora.webui.state import MAX_LORA_BYTES, WebUI

    ui = WebUI(args.outputs, args.base, REPO / "datasets", upload_dir)
    if args.base == "tiny" and not (REPO / "sdlora" / "base_model" / "model_index.json").is_file():
        print("WARNING: the built-in base 'tiny' is not built yet (python -m sdlora.tinybase build); "
              "training and generation will say so. Use --base tiny-random to try the UI meanwhile.", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") or args.share:
        where = "a public share link" if args.share else f"{args.host}"
        login = "" if auth else " Add --auth user:pass (or SDLORA_AUTH) to require a login."
        print(f"WARNING: the UI is reachable through {where}: anyone who can open it can train, read and delete "
              f"LoRAs in {ui.outputs}.{login}", file=sys.stderr)
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    demo = build(ui)
    demo.queue(default_concurrency_limit=2)
    _, local_url, share_url = demo.launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth, prevent_thread_lock=True,
        allowed_paths=[str(ui.outputs)], max_file_size=MAX_LORA_BYTES, quiet=True, ssr_mode=False,
        theme=theme, css=CSS, footer_links=[])
    print(f"uploads and generated images go to {upload_dir} (removed on exit); runs and LoRAs to {ui.outputs}")
    print(f"sdlora web UI: {local_url}" + (f" (public: {share_url})" if share_url else ""), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
