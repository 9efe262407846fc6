"""sdlora web UI: train a style LoRA, try it, keep a library of them.

    python app.py [--host H] [--port P] [--share] [--base tiny] [--models-dir DIR ...] [--outputs outputs]
                  [--auth user:pass]

Arguments, login and launch only: the page is `sdlora.webui.page`, its logic `sdlora.webui.state`
(plain methods, tested without a browser).
"""

import argparse
import atexit
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="sdlora web UI")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="make a public gradio.live link (prints a warning)")
    p.add_argument("--base", default="tiny", help="base model: 'tiny' (built in), a diffusers folder, a "
                   ".safetensors checkpoint path, or a hub id")
    p.add_argument("--models-dir", action="append", default=[], metavar="DIR",
                   help="a folder of checkpoints to pick bases from (repeatable; also $SDLORA_MODELS, and models/ "
                        "here), e.g. A1111's models/Stable-diffusion or ComfyUI's models/checkpoints")
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


def main(argv=None) -> None:
    args = parse_args(argv)
    auth = parse_auth(args.auth or os.environ.get("SDLORA_AUTH"))
    upload_dir = tempfile.mkdtemp(prefix="sdlora-uploads-")      # Gradio's uploads and result copies go here
    atexit.register(shutil.rmtree, upload_dir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))         # so the temporary folder is removed then too
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    from sdlora.webui.page import build
    from sdlora.webui.state import MAX_LORA_BYTES, WebUI
    from sdlora.webui.widgets import CSS

    from sdlora.bases.catalog import models_dirs
    dirs = models_dirs(args.models_dir, root=REPO)
    for d in dirs:
        if not d.is_dir() and str(d) in args.models_dir:
            raise SystemExit(f"app.py: error: --models-dir {d}: no such folder")
    ui = WebUI(args.outputs, args.base, REPO / "datasets", upload_dir, models_dirs=dirs)
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
