"""Build the built-in `tiny` base model: a real, small Stable Diffusion trained from scratch.

`python -m sdlora.tinybase build [--out DIR] [--quick]` draws the procedural
scenes of `sdlora.tinybase.scenes`, trains an `AutoencoderKL`, then a cross-attention
`UNet2DConditionModel` together with a `CLIPTextModel` (SD 1.5's tokenizer),
and saves a diffusers `StableDiffusionPipeline` folder (default
`sdlora/base_model/`). It is trained as SD was: scaled-linear betas
0.00085-0.012 over 1000 steps, epsilon prediction, VAE latents scaled to unit
spread, 10% empty captions for classifier-free guidance. Seeds are fixed and
figures are printed as it goes; `evaluate` is the quality bar the tests use.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from sdlora.tinybase import scenes, textures
from sdlora.tinybase.card import drawn_in_words, evaluate, write_model_card
from sdlora.tinybase.models import DEFAULT_OUT, TOKENIZER_DIR, SD_SCHEDULE, BuildConfig, log, n_params, write_whole
from sdlora.tinybase.words import make_dataset, tokenize
from sdlora.tinybase.stages import (train_vae, finetune_decoder, refine_decoder, encode_latents, check_vae,
                                    texture_round_trip, lines_round_trip, train_denoiser)


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, cfg: BuildConfig, figures: dict) -> StableDiffusionPipeline:
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            steps_offset=1)   # as SD 1.5's scheduler config
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # U-Net and VAE go to disk in fp16 (diffusers loads them as fp32 by default); the text encoder
    # stays fp32 because transformers would load fp16 weights as fp16. About 23 MB in all.
    for model in (unet, vae):
        model.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for model in (unet, vae):
        model.to(torch.float32)
    info = {"config": asdict(cfg), "figures": figures, "held_out": [list(p) for p in scenes.HELD_OUT],
            "schedule": SD_SCHEDULE}
    write_whole(out / "build.json", json.dumps(info, indent=2) + "\n")
    return pipe


def load_build_config(folder: Path) -> BuildConfig:
    """The BuildConfig a base folder was built with (its build.json)."""
    return build_config(json.loads((Path(folder) / "build.json").read_text(encoding="utf-8"))["config"])


def build_config(config: dict) -> BuildConfig:
    """A build.json "config" as a BuildConfig, lists back as tuples."""
    return BuildConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                          if k in BuildConfig.__dataclass_fields__})


def _built_base(folder: Path, threads: int) -> tuple[Path, dict]:
    """(folder, its build.json) of a base `build` saved, with torch on `threads`; a clear error for any other folder."""
    torch.set_num_threads(threads)
    folder = Path(folder)
    if not (folder / "build.json").is_file() or not (folder / "model_index.json").is_file():
        raise SystemExit(f"{folder} is not a base built by `python -m sdlora.tinybase build` (no build.json or "
                         "model_index.json); give the folder of one")
    return folder, json.loads((folder / "build.json").read_text(encoding="utf-8"))


def _pipeline(folder: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def remeasure(folder: Path, threads: int = 1) -> dict:
    """Measure a built base folder's figures that need no training (what its U-Net draws when asked, the lines its
    VAE gives back) with the code as it is now, and rewrite its build.json figures and model card: the weights are
    not touched."""
    folder, info = _built_base(folder, threads)
    cfg = build_config(info["config"])
    pipe = _pipeline(folder)
    info["figures"]["drawn_in_words"] = drawn_in_words(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    info["figures"].setdefault("vae", {})["lines_kept"] = lines_round_trip(pipe.vae)
    write_whole(folder / "build.json", json.dumps(info, indent=2) + "\n")
    write_model_card(folder, cfg, info["figures"])
    log(f"drawn in words: {info['figures']['drawn_in_words']}; lines kept by the VAE: "
        f"{info['figures']['vae']['lines_kept']}; build.json and README.md rewritten in {folder}")
    return info["figures"]


def training_images(cfg: BuildConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scenes, their caption ids, the VAE's images: the scenes, then arbitrary-colour and textured images), drawn
    from cfg's seeds: the same every time."""
    images, ids = make_dataset(cfg, tokenizer)
    log(f"{cfg.n_images} scenes drawn ({len(scenes.HELD_OUT)} colour-shape pairs held out)")
    rng = random.Random(cfg.seed + 5)
    extra = [np.asarray(scenes.random_colour_image(rng, outline_p=cfg.vae_outline_p)) for _ in range(cfg.vae_colour_images)]
    extra += [np.asarray(textures.random_texture_image(rng)) for _ in range(cfg.vae_texture_images)]
    vae_images = torch.cat([images, torch.from_numpy(np.stack(extra)).permute(0, 3, 1, 2).float() / 127.5 - 1]) \
        if extra else images
    return images, ids, vae_images


def vae_figures(vae, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """The card's VAE figures: reconstruction of the scenes, texture energy and lines' direction kept."""
    figs = check_vae(vae, images, mean)
    figs["texture_kept"] = texture_round_trip(vae)
    figs["lines_kept"] = lines_round_trip(vae)
    return figs


def vae_stages(cfg: BuildConfig, images: torch.Tensor, vae_images: torch.Tensor):
    """The build's VAE before the U-Net: trained on `vae_images`, then its decoder alone on their cached latents.
    (vae, the scenes' latent means and stds, unscaled, and the scaling factor that gives them unit spread)."""
    vae = train_vae(cfg, vae_images)
    mean, std = encode_latents(vae, images)
    scale = 1.0 / mean.std().item()                    # as SD's 0.18215: unit-spread latents
    log(f"latents cached; scaling_factor {scale:.4f}; VAE recon {check_vae(vae, images, mean)}")
    # the decoder fine-tunes on every VAE image (scenes first: their latents are what the U-Net learns)
    all_mean, all_std = encode_latents(vae, vae_images[len(images):]) if len(vae_images) > len(images) else (mean[:0], std[:0])
    vae = finetune_decoder(cfg, vae, (torch.cat([mean, all_mean]), torch.cat([std, all_std])), vae_images)
    vae.register_to_config(scaling_factor=scale)
    log(f"decoder fine-tuned; VAE recon {check_vae(vae, images, mean)}")
    return vae, mean, std, scale


def refine(folder: Path, sets: dict, threads: int = 1) -> dict:
    """Run the build's last VAE stage (stages.refine_decoder, with `sets` over the folder's build config) on a
    built base: only the decoder's weights change; build.json (config and figures) and the card are rewritten."""
    folder, info = _built_base(folder, threads)
    if info["config"].get("refine_steps"):
        raise SystemExit(f"{folder}'s decoder was refined already (refine_steps={info['config']['refine_steps']} in "
                         "its build.json): refine a base built without that stage")
    cfg = replace(build_config(info["config"]), **sets)
    if not cfg.refine_steps:
        raise SystemExit("refine: give --set refine_steps=N (N > 0)")
    t0 = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    images, _, vae_images = training_images(cfg, tokenizer)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    vae = refine_decoder(cfg, vae, vae_images)
    info["config"] = asdict(cfg)
    info["figures"]["vae"] = vae_figures(vae, images, encode_latents(vae, images[:64])[0])
    info["figures"]["refine_minutes"] = (time.time() - t0) / 60
    vae.to(torch.float16).save_pretrained(folder / "vae", safe_serialization=True)
    pipe = _pipeline(folder)
    result = evaluate(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    info["figures"]["held_out_eval"] = {k: result[k] for k in ("colour_acc", "shape_acc", "s_per_image_batched", "n")}
    info["figures"]["drawn_in_words"] = drawn_in_words(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    write_whole(folder / "build.json", json.dumps(info, indent=2) + "\n")
    write_model_card(folder, cfg, info["figures"])
    log(f"decoder refined in {info['figures']['refine_minutes']:.1f} min: VAE {info['figures']['vae']}; held-out "
        f"colour {result['colour_acc']:.0%}, shape {result['shape_acc']:.0%}; build.json and README.md rewritten")
    return info["figures"]


def reused_vae(folder: Path, images: torch.Tensor):
    """A built base's VAE, for a build that trains only a new U-Net and text encoder on its latents:
    (vae, the scenes' latent means and stds, unscaled, its scaling factor)."""
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32)
    with torch.no_grad():
        mean, std = encode_latents(vae, images)
    scale = float(vae.config.scaling_factor)
    log(f"VAE reused from {folder}; scaling_factor {scale:.4f}; VAE recon {check_vae(vae, images, mean)}")
    return vae, mean, std, scale


VAE_FIELDS = ("vae_", "decoder_", "kl_weight", "texture_weight", "refine_steps", "line_images", "direction_weight")


def build(cfg: BuildConfig, out: Path, vae_from: Path | None = None) -> dict:
    """Build a base into `out`; with `vae_from` (a built base's folder), its VAE is kept and only the U-Net and
    the text encoder are trained, on that VAE's latents (cfg's VAE settings become that build's)."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    if vae_from is not None:
        source = build_config(_built_base(vae_from, cfg.threads)[1]["config"])
        cfg = replace(cfg, **{k: getattr(source, k) for k in BuildConfig.__dataclass_fields__ if k.startswith(VAE_FIELDS)})
    images, ids, vae_images = training_images(cfg, tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]
    vae, mean, std, scale = reused_vae(vae_from, images) if vae_from is not None else vae_stages(cfg, images, vae_images)
    unet, text_encoder, steps_done = train_denoiser(cfg, (mean * scale, std * scale), ids, empty_ids, t_start,
                                                    tokenizer)
    if cfg.refine_steps and vae_from is None:
        vae = refine_decoder(cfg, vae, vae_images)
    vae_figs = vae_figures(vae, images, mean)
    log(f"VAE {vae_figs}")
    cfg = replace(cfg, unet_steps=steps_done, max_minutes=0.0)
    figures = {"vae": vae_figs, "scaling_factor": scale, "train_minutes": (time.time() - t_start) / 60,
               **({"vae_reused": True} if vae_from is not None else {}),
               "params_m": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)}}
    pipe = save_pipeline(out, vae, unet, text_encoder, tokenizer, cfg, figures)
    result = evaluate(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    figures["held_out_eval"] = {k: result[k] for k in ("colour_acc", "shape_acc", "s_per_image_batched", "n")}
    figures["drawn_in_words"] = drawn_in_words(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    figures["build_minutes"] = (time.time() - t_start) / 60
    save_pipeline(out, vae, unet, text_encoder, tokenizer, cfg, figures)
    write_model_card(out, cfg, figures)
    log(f"held-out: colour {result['colour_acc']:.0%}, shape {result['shape_acc']:.0%} "
        f"({result['n']} images, {result['s_per_image_batched']:.2f}s/image); saved to {out}")
    return figures


def parse_sets(items: list[str]) -> dict:
    """`--set FIELD=JSON` items as BuildConfig overrides (lists as tuples); ValueError naming the item that is not
    a BuildConfig field or not JSON."""
    sets = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in BuildConfig.__dataclass_fields__:
            raise ValueError(f"--set {item}: {name!r} is not a BuildConfig field")
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--set {item}: {value!r} is not JSON (a number, true/false, a [list] or a "
                             '"string")') from None
        sets[name] = tuple(value) if isinstance(value, list) else value
    return sets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlora.tinybase", description="Build the tiny base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train from scratch and save a diffusers pipeline")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    b.add_argument("--quick", action="store_true", help="a few-minute smoke run (not a usable model)")
    b.add_argument("--unet-steps", type=int, help="override the U-Net training steps")
    b.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a BuildConfig field, e.g. --set 'unet_cross_attention=[false,true,true]'")
    b.add_argument("--batch", type=int, help="override the U-Net batch size")
    b.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    b.add_argument("--max-minutes", type=float, help="stop U-Net training after this long (shared machines)")
    b.add_argument("--vae-from", type=Path, help="keep this built base's VAE (its folder) and train only a new U-Net "
                                                 "and text encoder on its latents: layouts compared on one VAE")
    c = sub.add_parser("card", help="measure a built base's figures that need no training again, with the code "
                                    "as it is now, and rewrite its build.json figures and model card (weights untouched)")
    c.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the base folder (default {DEFAULT_OUT})")
    c.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    r = sub.add_parser("refine", help="run the build's last stage, the decoder's refinement (stages.refine_decoder), "
                                      "on a base built without it: only the decoder's weights change")
    r.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the base folder (default {DEFAULT_OUT})")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="refine_steps (needed), line_images, direction_weight")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    if args.command == "card":
        remeasure(args.out, args.threads)
        return
    try:
        sets = parse_sets(args.set)
    except ValueError as err:
        parser.error(str(err))
    if args.command == "refine":
        refine(args.out, sets, args.threads)
        return
    cfg = BuildConfig.quick() if args.quick else BuildConfig()
    if args.unet_steps:
        cfg = replace(cfg, unet_steps=args.unet_steps)
    cfg = replace(cfg, **sets)
    if args.batch:
        cfg = replace(cfg, batch=args.batch)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    if args.max_minutes:
        cfg = replace(cfg, max_minutes=args.max_minutes)
    build(cfg, args.out, args.vae_from)


if __name__ == "__main__":
    main()
