"""The `tiny` base model's quality bar and its model card.

`evaluate` draws the held-out colour-shape prompts (pairs the build never
showed together) with fixed seeds and judges each image with
`sdlora.tinybase.scenes.measure`; the build (sdlora.tinybase) and tests/test_tinybase.py
both use it. `write_model_card` writes the saved pipeline's README.md.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline

from sdlora.tinybase import scenes
from sdlora.tinybase.models import write_whole

if TYPE_CHECKING:
    from sdlora.tinybase.models import BuildConfig


def held_out_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape): 6 held-out pairs x 2 sizes x 3 backgrounds, all centred."""
    return [(f"a {size} {colour} {shape} in the center on a {bg} background", colour, shape)
            for colour, shape in scenes.HELD_OUT for size in ("medium", "large") for bg in scenes.BACKGROUNDS]


@torch.no_grad()
def evaluate(pipe: StableDiffusionPipeline, steps: int = 20, guidance: float = 5.0, seed: int = 0,
             batch: int = 12) -> dict:
    """Colour and shape accuracy on held-out prompts, and seconds per image."""
    prompts = held_out_prompts()
    images, t0 = [], time.time()
    for i in range(0, len(prompts), batch):
        chunk = [p for p, _, _ in prompts[i:i + batch]]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images
    per_image = (time.time() - t0) / len(prompts)
    got = [scenes.measure(im) for im in images]
    colour = sum(g[0] == c for g, (_, c, _) in zip(got, prompts)) / len(prompts)
    shape = sum(g[1] == s for g, (_, _, s) in zip(got, prompts)) / len(prompts)
    return {"colour_acc": colour, "shape_acc": shape, "s_per_image_batched": per_image,
            "n": len(prompts), "images": images, "measured": got}


# The looks the captions have a word for, each with the statistic that reads it (sdlora.tinybase.stylestats):
# the outline as the lit share of the shape, a texture as the background's texture energy.
LOOK_WORDS = ("outline", *scenes.TEXTURES)
WORD_PAIRS = (("red", "circle"), ("yellow", "triangle"), ("green", "square"), ("blue", "star"),
              ("purple", "circle"), ("cyan", "square"))        # none of them held out
TEXTURE_SCALES = scenes.TEXTURE_SCALES                        # the build draws a texture word at one of these


def _look(scene: scenes.Scene, word: str, scale: float = 4.0) -> scenes.Scene:
    from dataclasses import replace
    return replace(scene, look="outline") if word == "outline" else replace(scene, texture=word, texture_scale=scale)


@torch.no_grad()
def drawn_in_words(pipe: StableDiffusionPipeline, steps: int = 20, guidance: float = 5.0, seed: int = 0,
                   pairs: tuple[tuple[str, str], ...] = WORD_PAIRS, seeds: int = 2) -> dict[str, dict[str, float]]:
    """How much of each look the U-Net draws when the prompt names it: {word: {"without", "with", "drawn",
    "share"}}. Large centred shapes of `pairs` on white, `seeds` images each, are drawn with and without the
    word; "drawn" is the statistic of the build's own pictures of those captions after a VAE round trip (every
    texture scale the build uses), "share" = (with - without) / (drawn - the plain pictures' value)."""
    from sdlora.tinybase import stylestats
    from sdlora.tinybase.stages import vae_round_trip
    plain = [scenes.Scene(colour=c, shape=s, size="large", position="in the center", background="white")
             for c, s in pairs]

    def generate(prompts: list[str]) -> list:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens).images

    without_images = generate([sc.caption() for sc in plain for _ in range(seeds)])
    plain_drawn = vae_round_trip(pipe.vae, [scenes.render(sc) for sc in plain])
    out = {}
    for word in LOOK_WORDS:
        stat = stylestats.fill_ratio if word == "outline" else stylestats.background_texture
        scales = (4.0,) if word == "outline" else TEXTURE_SCALES
        drawn = vae_round_trip(pipe.vae, [scenes.render(_look(sc, word, scale)) for sc in plain
                                          for scale in scales])
        with_images = generate([_look(sc, word).caption() for sc in plain for _ in range(seeds)])
        base, shown = stylestats.mean_stat(stat, plain_drawn), stylestats.mean_stat(stat, drawn)
        without, with_word = stylestats.mean_stat(stat, without_images), stylestats.mean_stat(stat, with_images)
        out[word] = {"without": round(without, 3), "with": round(with_word, 3), "drawn": round(shown, 3),
                     "share": round((with_word - without) / (shown - base), 3) if shown != base else float("nan")}
    return out


def look_and_words(cfg: BuildConfig) -> list[str]:
    """What the card says about outlines and about a made-up word in front (a LoRA's trigger)."""
    lines = []
    if cfg.outline_p:
        lines.append("A shape is filled unless the prompt says `outline` (`a red circle outline`), which the model "
                     "draws as a hollow shape some of the time.")
    if cfg.prefix_meaning:
        lines.append("In training, a made-up word in front (`glowbird, a red circle`) told the size by its fixed "
                     "embedding, so that the model would read such a word (a LoRA's trigger) instead of skipping "
                     "it; tests/test_tinybase.py checks whether it learned to.")
    elif cfg.identity_weight:
        lines.append("A made-up word in front (`glowbird, a red circle`) changes little, as a LoRA's trigger does "
                     "before training, but keeps a text state of its own, so a LoRA can tie a style to it.")
    else:
        lines.append("A made-up word in front (`glowbird, a red circle`) is ignored, as a LoRA's trigger is before "
                     "training.")
    return lines


def write_model_card(out: Path, cfg: BuildConfig, figures: dict) -> None:
    """README.md for the saved pipeline: vocabulary, training choices and measured figures."""
    ev, pm = figures.get("held_out_eval", {}), figures["params_m"]
    pairs = ", ".join(f"{c} {s}" for c, s in scenes.HELD_OUT)
    lines = [
        "# sdlora `tiny` base model", "",
        "A real Stable Diffusion 1.x-architecture pipeline (diffusers `AutoencoderKL`, cross-attention",
        "`UNet2DConditionModel`, `CLIPTextModel`, SD 1.5's `CLIPTokenizer`, `DPMSolverMultistepScheduler`),",
        "trained from scratch on CPU by `python -m sdlora.tinybase build` on procedural 64x64 scenes.",
        "It exists so that every code path a user takes with SD 1.5 can run, and be tested, in seconds.", "",
        "## What it draws", "",
        "One shape on a plain, two-tone or textured background, 64x64 px (16x16x4 latents). Prompts read",
        "`a [size] <colour> <shape> [position] [on a [texture] <background> background]`, e.g.",
        "`a small red circle on the left on a dotted cream background`; without a background the model picks one.",
        *look_and_words(cfg), "",
        f"- colours: {', '.join(scenes.COLOURS)}" + (f"; {' or '.join(scenes.TINTS)} before one (`a pale red "
                                                     "circle`)" if cfg.tint_p else ""),
        f"- shapes: {', '.join(scenes.SHAPES)}",
        f"- sizes: {', '.join(scenes.SIZES)} (optional)",
        f"- positions: {', '.join(scenes.POSITIONS)} (optional)",
        f"- backgrounds: {', '.join(scenes.BACKGROUNDS)}, or two of them (`white and black`) (optional)",
        f"- background textures: {', '.join(scenes.TEXTURES)} (optional; {cfg.texture_p:.0%} of the scenes)"
        + (f"; stripes with their angle ({', '.join(scenes.STRIPE_ANGLES.values())}) and width (fine, wide, or "
           "neither) before them: `a wide diagonal striped white background`" if cfg.stripe_words else ""),
        f"- held out of training (never drawn together): {pairs}", "",
        "## How it was trained", "",
        "- noise schedule as SD: scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction",
        f"- {cfg.empty_caption_p:.0%} empty captions (the caption replaced by \"\"), so classifier-free guidance works",
        f"- besides 4 template captions per scene, {cfg.free_captions} free ones: the background left out "
        f"{cfg.no_background_p:.0%} of the time, a made-up word (1-2 whole-word CLIP tokens) in front {cfg.prefix_p:.0%}",
        f"- offset noise {cfg.noise_offset} (a per-channel constant added to the noise): SD's schedule leaves ~7% "
        "of the image at t=999, and without it the model reads an image's brightness from the starting noise "
        "instead of the caption, so a fine-tune cannot teach a dark style",
        *([f"- {cfg.outline_p:.0%} of the scenes drawn as outlines {cfg.outline_widths[0]:g}-{cfg.outline_widths[1]:g} "
           f"px wide, named in the caption except in {cfg.no_look_p:.0%} of the free captions"] if cfg.outline_p else []),
        *([f"- {cfg.tint_p:.0%} of the shapes pale or dark (" + ", ".join(
            f"`{w}`: {lo:.0%}-{hi:.0%} of the way to white" if w == "pale" else f"`{w}`: {lo:.0%}-{hi:.0%} of "
            "the value taken away" for w, (lo, hi) in scenes.TINTS.items()) + "), always named"] if cfg.tint_p else []),
        *([f"- {cfg.backdrop_p:.0%} of the scenes on a muted backdrop of any hue and value (chroma up to "
           f"{2 * scenes.BACKDROP_SPREAD}) that no caption names, so the model has drawn backgrounds it has no "
           "word for"] if cfg.backdrop_p else []),
        *([f"- tokens no caption uses keep a fixed random embedding (norm ~{cfg.free_word_norm}); a made-up word "
           "in front is one whose embedding leans to the scene's size"] if cfg.prefix_meaning else []),
        *([f"- word identity (loss weight {cfg.identity_weight:g}): the text encoder also learns to let each word's "
           "token be read back from its output state, and the caption's words from the end-of-text state. Trained "
           "on denoising alone it gave every word the captions never use (a LoRA's trigger among them) nearly one "
           "state, and a LoRA trained on the U-Net then restyled prompts without the trigger as much as with it"]
          if cfg.identity_weight else []),
        f"- the VAE's extra arbitrary-colour images are {cfg.vae_outline_p:.0%} outlines, so thin coloured lines keep their hue",
        *([f"- the VAE also trained on {cfg.vae_texture_images} textured images (hatching, dots, grain, brush strokes "
           "at 2-8 px, any colours) with a texture-energy loss (weight "
           f"{cfg.texture_weight:g}) beside L1 + MSE; its decoder then fine-tuned on every VAE image"]
          if cfg.vae_texture_images else []),
        f"- VAE: {pm['vae']:.2f}M params, {cfg.vae_steps} steps; latents scaled by "
        f"`scaling_factor` = {figures['scaling_factor']:.4f} (1 / their std, as SD's 0.18215)",
        f"- U-Net {pm['unet']:.2f}M params (channels {tuple(cfg.unet_channels)}, cross-attention at "
        f"{' and '.join(f'{16 >> i}x{16 >> i}' for i, a in enumerate(cfg.unet_cross_attention) if a)}) and "
        f"text encoder {pm['text_encoder']:.2f}M params ({cfg.text_layers} layers, width {cfg.text_hidden}; "
        "most of it the 49,408-token embedding) trained together",
        f"- {cfg.unet_steps} steps at batch {cfg.batch}, AdamW lr {cfg.lr} (constant after {cfg.warmup} warm-up "
        f"steps), EMA {cfg.ema_decay}; {cfg.n_images} scenes, seed {cfg.seed}",
        "- weights: U-Net and VAE in fp16 (diffusers loads them as fp32), text encoder in fp32",
        "- full settings and figures: `build.json`", "",
        "## Use and measured figures", "",
        f"Recommended: {cfg.sample_steps} steps of the saved DPM-Solver++ scheduler, guidance {cfg.guidance}, 64x64; "
        f"LoRA learning rate {cfg.lora_lr:g} (`lora_lr` in `build.json`, which sdlora's trainer uses when no lr is set) "
        f"and {cfg.lora_steps_per_image} training steps per image (`lora_steps_per_image`, used when no steps are set; "
        "SD checkpoints get 100).", "",
        f"- held-out prompts ({ev.get('n', '?')} images, fixed seeds): prompt's colour dominant in "
        f"{ev.get('colour_acc', float('nan')):.0%}, prompt's shape in {ev.get('shape_acc', float('nan')):.0%}",
        f"- {ev.get('s_per_image_batched', float('nan')):.2f} s per image (batches of 12, CPU, {cfg.threads} thread)",
        f"- build time {figures.get('build_minutes', float('nan')):.0f} min on a shared 2-core CPU", "",
    ]
    kept = figures.get("vae", {}).get("texture_kept")
    if kept:
        scales = list(next(iter(kept.values())))
        lines += ["## What its VAE gives back", "",
                  "Share of a texture's energy (mean |luminance - local mean|) left after a VAE round trip, dark "
                  "ink over cream, 8 images each (`stages.texture_round_trip`). A LoRA cannot draw more of a "
                  "style than its base's VAE gives back: a texture kept under about a third is out of reach.", "",
                  "| texture | " + " | ".join(f"{s} px" for s in scales) + " |",
                  "|---|" + "---|" * len(scales)]
        lines += [f"| {kind} | " + " | ".join(f"{v:.0%}" for v in row.values()) + " |" for kind, row in kept.items()]
        def finest(share: float) -> str:
            found = [f"{kind} from {next(s for s, v in row.items() if v >= share)} px" for kind, row in kept.items()
                     if any(v >= share for v in row.values())]
            return ", ".join(found) or "none of them"
        lines += ["", f"Kept at least half: {finest(0.5)}. At least a third: {finest(1 / 3)}. Finer textures "
                  "come back flatter.", ""]
    kept_lines = figures.get("vae", {}).get("lines_kept")
    if kept_lines:
        periods = list(next(iter(kept_lines.values())))
        lines += ["Texture energy counts what comes back whatever its direction. Lines keep their look only if "
                  "they keep their direction: the share of dark lines' contrast across them over along them "
                  "(`textures.line_contrast`) left after a round trip, over cream, 4 phases each "
                  "(`stages.lines_round_trip`; over 100%: sharper than drawn). Lines that lose their direction "
                  "come back as a texture without it, which no LoRA can turn back into lines:", "",
                  "| lines | " + " | ".join(f"{p} px apart" for p in periods) + " |",
                  "|---|" + "---|" * len(periods)]
        lines += [f"| {'vertical' if angle == '0' else angle + ' degrees'} | "
                  + " | ".join(f"{v:.0%}" for v in row.values()) + " |" for angle, row in kept_lines.items()]
        lines += [""]
    words = figures.get("drawn_in_words")
    if words:
        low, high = cfg.texture_shades
        shades = (f"The build lays a texture over the background in a shade of it ({low:.0%} of a light "
                  "background's value), so these are textures of that strength: dark ink, as in `datasets/hatch`, "
                  "is further than any of them. " if low == high else
                  f"The build lays a texture over the background in a shade of it, {low:.0%} to {high:.0%} of a "
                  "light background's value (dark ink to a faint shade), and the caption does not say which. ")
        lines += ["## What its U-Net draws when asked", "",
                  "Large centred shapes on white, 6 colour-shape pairs x 2 seeds, drawn with and without the word "
                  "(`card.drawn_in_words`): the outline read as the lit share of the shape, a texture as the "
                  "background's texture energy (`sdlora.tinybase.stylestats`). *Drawn* is the build's own "
                  "pictures of those captions after a VAE round trip; *share* is how much of the way from plain "
                  "pictures to them the word takes the U-Net. " + shades + "A style LoRA on the U-Net's "
                  "attention steers what the U-Net can draw: a look it draws little of when asked is hard to "
                  "teach it.", "",
                  "| word | statistic | without the word | with it | drawn | share |", "|---|---|---|---|---|---|"]
        lines += [f"| {word} | {'lit share of the shape' if word == 'outline' else 'background texture'} | "
                  f"{w['without']:.3f} | {w['with']:.3f} | {w['drawn']:.3f} | "
                  f"{'-' if math.isnan(w['share']) else format(w['share'], '.0%')} |"
                  for word, w in words.items()]
        lines += [""]
    if ev and (ev["colour_acc"] < 0.9 or ev["shape_acc"] < 0.7):
        lines += ["**Below the quality bar** (prompt's colour >= 90%, shape >= 70% on held-out prompts).", ""]
    lines += [f"Note: {note}" for note in figures.get("notes", [])]
    write_whole(out / "README.md", "\n".join(lines))
