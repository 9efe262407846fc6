"""`sdlora train | generate | inspect | check | merge`: thin wrappers over the library.

Bad arguments and bad files end with one line `sdlora: error: ...` and exit status 2;
no traceback (set SDLORA_DEBUG=1 to see one).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdlora.config import DataConfig, GenerateConfig, LoraSpec, TrainConfig
from sdlora.training.loop import Callbacks


def _float_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a style LoRA from a folder of images")
    p.add_argument("--data", help="folder of images (with optional same-name .txt captions)")
    p.add_argument("--trigger", default=None,
                   help="the word that calls up the style (default: the dataset's sdlora.json, else sks)")
    p.add_argument("--template", default=None, help="caption for images without a .txt (default: "
                   "the dataset's sdlora.json, else 'an image in {trigger} style')")
    p.add_argument("--base", default="tiny", help="'tiny' (built in), a diffusers folder, a .safetensors or a hub id")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: from the number of images)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank: width of the update (bigger learns more, file grows)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank (default: rank)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=None,
                   help="LoRA learning rate (default: the base's recommendation, 1e-3 for tiny; else 1e-4)")
    p.add_argument("--text-encoder", action="store_true", help="also train the CLIP text encoder")
    p.add_argument("--text-encoder-lr", type=float, default=None)
    p.add_argument("--self-attention", action="store_true", help="also adapt U-Net self-attention (attn1)")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--resolution", type=int, default=None, help="px (default: the base's native size)")
    p.add_argument("--flip", action="store_true", help="random horizontal flips")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--noise-offset", type=float, default=0.0)
    p.add_argument("--min-snr-gamma", type=_float_or_none, default=None)
    p.add_argument("--class-prompt", default="", help="prior preservation: prompt of the class")
    p.add_argument("--class-data", default="", help="prior preservation: folder of class images")
    p.add_argument("--num-class-images", type=int, default=0, help="prior preservation: how many (0 = off)")
    p.add_argument("--prior-loss-weight", type=float, default=1.0)
    p.add_argument("--trigger-isolation", type=float, default=TrainConfig.trigger_isolation,
                   help="weight that keeps prompts without the trigger (and guidance's empty prompt) as the "
                        "base draws them (0 = off)")
    p.add_argument("--word-dropout", type=float, default=TrainConfig.word_dropout,
                   help="leave each caption word but the trigger out with this probability, in "
                        "--caption-variants variants per image (0 = off)")
    p.add_argument("--caption-variants", type=int, default=TrainConfig.caption_variants)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=int, default=0, help="save sample images every N steps")
    p.add_argument("--checkpoint-every", type=int, default=0, help="save a resumable checkpoint every N steps")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--name", default="", help="run and file name (default: the trigger word)")
    p.add_argument("--format", default="kohya", choices=["kohya", "diffusers"])
    p.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")


def _configs(a) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    from sdlora.data.scan import folder_defaults
    own = folder_defaults(a.data) if a.data and Path(a.data).is_dir() else {}
    trigger = a.trigger or own.get("trigger", DataConfig.trigger)
    template = a.template or own.get("template", DataConfig.template)
    data = DataConfig(folder=a.data or "", trigger=trigger, template=template, resolution=a.resolution,
                      flip=a.flip, class_prompt=a.class_prompt, class_folder=a.class_data,
                      num_class_images=a.num_class_images)
    spec = LoraSpec(rank=a.rank, alpha=a.alpha, dropout=a.dropout, self_attention=a.self_attention,
                    text_encoder=a.text_encoder, use_dora=a.dora, use_rslora=a.rslora)
    cfg = TrainConfig(base=a.base, steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=a.lr,
                      text_encoder_lr=a.text_encoder_lr, schedule=a.schedule, warmup_steps=a.warmup_steps,
                      mixed_precision=a.mixed_precision, gradient_checkpointing=a.gradient_checkpointing,
                      noise_offset=a.noise_offset, min_snr_gamma=a.min_snr_gamma,
                      prior_loss_weight=a.prior_loss_weight, trigger_isolation=a.trigger_isolation,
                      word_dropout=a.word_dropout, caption_variants=a.caption_variants,
                      seed=a.seed, sample_every=a.sample_every,
                      checkpoint_every=a.checkpoint_every, output_dir=a.output_dir, run_name=a.name,
                      save_format=a.format, save_dtype=a.save_dtype)
    return data, spec, cfg


class _Printer(Callbacks):
    """Callbacks that draw a one-line progress bar on stderr."""

    def on_plan(self, plan) -> None:
        err = sys.stderr
        print(f"{len(plan.items)} images, {plan.steps} steps at {plan.resolution}px. Captions:", file=err)
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
    if a.resume is None and not a.data:
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
    p.add_argument("--out", required=True, help="PNG file to write")


def cmd_generate(a) -> int:
    from sdlora.generate import Generator, LoraChoice
    from sdlora.runs import write_png
    cfg = GenerateConfig(prompt=a.prompt, negative_prompt=a.negative_prompt, seed=a.seed, steps=a.steps,
                         guidance=a.guidance, width=a.width, height=a.height)
    out = Path(a.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out {a.out}: use a file name ending in .png")
    gen = Generator(a.base)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sdlora", description="Train and use Stable Diffusion style LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    _extra_parsers(sub)
    a = parser.parse_args(argv)
    handler = {"train": cmd_train, "generate": cmd_generate, "inspect": cmd_inspect, "check": cmd_check,
               "merge": cmd_merge}[a.command]
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


if __name__ == "__main__":
    sys.exit(main())
