"""`sdlora train | generate | inspect | check | merge | caption`: thin wrappers over the library.

Bad arguments and bad files end with one line `sdlora: error: ...` and exit status 2;
no traceback (set SDLORA_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from sdlora.config import DataConfig, GenerateConfig, LoraSpec, TrainConfig, configs_from_values, settings
from sdlora.bases.precision import PRECISIONS
from sdlora.training.events import Callbacks


def _optional(kind: type):
    """argparse type for a setting that may be None: 'none' (any case) gives None."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__          # argparse names the type in its error message
    return parse


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """One flag per declared training setting (sdlora.config), with its help, type and choices.

    Every default is None here: a flag not given keeps the config's own default (or, for a derived
    setting, the value training.plan.suggested works out), so the CLI holds no second copy of them."""
    for s in settings():
        if not s.flag:
            continue
        shown = "" if "default" in s.help else f" (default: {s.default!r})"
        kw: dict = {"dest": s.name, "default": None, "help": s.help + shown}
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif s.choices:
            kw["choices"] = s.choices
        else:
            kw["type"] = _optional(s.kind) if s.optional else s.kind
            kw["metavar"] = s.name.upper()
        p.add_argument(s.flag, **kw)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a style LoRA from a folder of images")
    add_setting_flags(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")


def _configs(a) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    from sdlora.data.captions import folder_defaults
    values = {s.name: getattr(a, s.name) for s in settings() if s.flag and getattr(a, s.name) is not None}
    if values.get("folder") and Path(values["folder"]).is_dir():   # the dataset's own sdlora.json
        values = {**folder_defaults(values["folder"]), **values}
    return configs_from_values(values)


class _Printer(Callbacks):
    """Callbacks that draw a one-line progress bar on stderr."""

    def on_plan(self, plan) -> None:
        err = sys.stderr
        print(f"{len(plan.items)} images, {plan.steps} steps at {plan.resolution}px; buckets {plan.buckets}. "
              "Captions:", file=err)
        for name, caption in plan.captions.items():
            print(f"  {name}: {caption}", file=err)
        for p in plan.problems:
            print(f"  {'skipped' if p.fatal else 'note'}: {p.reason}", file=err)

    def on_step(self, info) -> None:
        width = 30
        filled = int(width * info.step / info.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {info.step}/{info.total} "
                         f"loss {info.loss:.4f} lr {info.lr:.1e} {info.elapsed:.0f}s, {info.eta:.0f}s left ")
        if info.step == info.total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def on_sample(self, step, paths) -> None:
        print(f"\nsamples at step {step}: {paths[0].parent}", file=sys.stderr)

    def on_checkpoint(self, step, path) -> None:
        pass

    def on_message(self, text) -> None:
        print(text, file=sys.stderr)


def cmd_train(a) -> int:
    from sdlora.training.loop import train
    if a.resume is None and not a.folder:
        raise ValueError("--data is required (a folder of images), or --resume RUN_DIR to continue a run")
    data, spec, cfg = _configs(a) if a.resume is None else (None, None, None)
    result = train(data, spec, cfg, callbacks=_Printer(), resume=a.resume)
    if result.lora_path is not None:      # only the main process exports; the others print nothing
        print(result.lora_path)
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate an image with one or more LoRAs")
    p.add_argument("--base", default="tiny")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH[:TE_STRENGTH]]")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--fused", action="store_true", help="merge LoRAs into the weights (faster per image)")
    p.add_argument("--base-precision", default="fp32", choices=PRECISIONS,
                   help="keep the base in this precision; int8/nf4 quantise its linear layers with bitsandbytes "
                        "(LoRAs are then applied unfused)")
    p.add_argument("--out", required=True, help="PNG file to write")


def cmd_generate(a) -> int:
    from sdlora.generate import Generator, LoraChoice
    from sdlora.runs import write_png
    cfg = GenerateConfig(prompt=a.prompt, negative_prompt=a.negative_prompt, seed=a.seed, steps=a.steps,
                         guidance=a.guidance, width=a.width, height=a.height)
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {a.out}: use a file name ending in .png")
    gen = Generator(a.base, precision=a.base_precision)
    choices = [LoraChoice.parse(x) for x in a.lora]
    for ld in gen.set_loras(choices, fused=a.fused):
        if ld.unused:
            print(f"note: {ld.path}: {len(ld.unused)} keys match no module of the base and are not used: "
                  f"{', '.join(ld.unused[:5])}{' ...' if len(ld.unused) > 5 else ''}", file=sys.stderr)
    image = gen.generate(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(out, image)
    print(out)
    return 0


def cmd_inspect(a) -> int:
    from sdlora.loras.inspect import describe
    info = describe(a.file)
    if a.json:
        print(json.dumps(info, indent=2, ensure_ascii=False))
    else:
        for k, v in info.items():
            if k != "metadata":
                print(f"{k}: {v}")
    return 0


def cmd_check(a) -> int:
    from sdlora.loras.check import check_file, format_check
    from sdlora.bases.load import load_base
    report = check_file(a.file, load_base(a.base))
    print(json.dumps(report, indent=2) if a.json else format_check(report))
    return 0 if report["ok"] else 1


def cmd_merge(a) -> int:
    from sdlora.generate import Generator, LoraChoice
    from sdlora.generate import merge
    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {a.out}: use a file name ending in .safetensors")
    if out.exists() and not a.overwrite:
        raise ValueError(f"--out {a.out} exists; choose another name or pass --overwrite")
    gen = Generator(a.base)
    gen.set_loras([LoraChoice.parse(x) for x in a.lora], fused=True)
    merge(gen, out, metadata={"sdlora_merged_loras": json.dumps(a.lora)})
    print(out)
    return 0


def _extra_parsers(sub) -> None:
    p = sub.add_parser("inspect", help="show a LoRA file's format, base, modules, rank, alpha, trigger")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("check", help="will A1111, ComfyUI and diffusers use every key of this LoRA on BASE?")
    p.add_argument("file")
    p.add_argument("--base", default="tiny")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("merge", help="bake LoRAs into a single-file checkpoint (original-SD layout)")
    p.add_argument("--base", default="tiny")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH[:TE_STRENGTH]]")
    p.add_argument("--out", required=True, help=".safetensors file to write")
    p.add_argument("--overwrite", action="store_true")


def _caption_parser(sub) -> None:
    from sdlora.data.captioning import EXAMPLE_MODEL
    p = sub.add_parser("caption", help="write a .txt caption for every image without one, with an image-captioning "
                       "model (exit 1 if some image failed)")
    p.add_argument("folder", metavar="DIR", help="the dataset folder (its images, as training sees them)")
    p.add_argument("--model", required=True, help="a transformers image-to-text model (BLIP, GIT, ViT-GPT2, "
                   f"Florence-2): a hub id, e.g. {EXAMPLE_MODEL} (needs network once), or a local folder of one")
    p.add_argument("--overwrite", action="store_true", help="replace existing captions too (default: keep them)")
    p.add_argument("--prefix", default="", help="put in front of every caption, joined with ', ' "
                   "(typically the trigger word)")
    p.add_argument("--suffix", default="", help="put after every caption, joined with ', '")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="at most N words from the model")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")


def cmd_caption(a) -> int:
    from sdlora.data.captioning import caption_folder
    device = a.device
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def show(done, total, result):
        print(f"[{done}/{total}] {result.line()}", flush=True)
    report = caption_folder(a.folder, a.model, overwrite=a.overwrite, prefix=a.prefix, suffix=a.suffix,
                            max_length=a.max_length, device=device, on_progress=show)
    print(report.summary())
    return 1 if report.of("failed") else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and use Stable Diffusion style LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _extra_parsers(sub)
    _caption_parser(sub)
    a = parser.parse_args(argv)
    handler = {"train": cmd_train, "generate": cmd_generate, "inspect": cmd_inspect, "check": cmd_check,
               "merge": cmd_merge, "caption": cmd_caption}[a.command]
    shown = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"sdlora: note: {message}\n"   # one line, no source
    try:
        return handler(a)
    except KeyboardInterrupt:
        print("sdlora: stopped", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("SDLORA_DEBUG"):
            raise
        print(f"sdlora: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
