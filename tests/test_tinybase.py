"""The committed tiny base model (sdlora/base_model) meets its quality bar.

Loads it offline with diffusers exactly as a user's SD 1.5 folder is loaded,
draws held-out colour-shape prompts (pairs the build never showed together)
with fixed seeds, and judges each image with sdlora.tinybase.scenes.measure: the
dominant saturated colour, and the shape template that best fits the
foreground's bounding box.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlora.tinybase import scenes
from sdlora.tinybase.models import SD_SCHEDULE
from sdlora.tinybase.card import evaluate, held_out_prompts

BASE = Path(__file__).resolve().parent.parent / "sdlora" / "base_model"
pytestmark = pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="tiny base model not built")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = StableDiffusionPipeline.from_pretrained(BASE, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def build_info():
    return json.loads((BASE / "build.json").read_text())


def test_architecture_is_stable_diffusion(pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any("CrossAttn" in b for b in pipe.unet.config.down_block_types)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == scenes.IMAGE_SIZE
    assert 0.05 < pipe.vae.config.scaling_factor < 20


def test_scheduler_is_sd_schedule(pipe):
    cfg = pipe.scheduler.config
    assert cfg.num_train_timesteps == 1000
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert cfg.prediction_type == "epsilon"
    assert SD_SCHEDULE["prediction_type"] == "epsilon"


def test_training_choices_recorded(build_info):
    assert build_info["config"]["empty_caption_p"] == pytest.approx(0.1)
    assert build_info["schedule"]["beta_schedule"] == "scaled_linear"
    readme = (BASE / "README.md").read_text()
    assert "10%" in readme and "empty caption" in readme.lower()
    assert [tuple(p) for p in build_info["held_out"]] == list(scenes.HELD_OUT)


def test_weights_within_budget():
    size = sum(p.stat().st_size for p in BASE.rglob("*.safetensors"))
    assert size <= 25 * 1024 * 1024, f"{size / 2**20:.1f} MiB of weights"


def test_held_out_prompts_are_never_trained():
    import random
    rng = random.Random(0)
    seen = {(s.colour, s.shape) for s in (scenes.random_scene(rng) for _ in range(3000))}
    assert not seen & set(scenes.HELD_OUT)
    assert len(held_out_prompts()) >= 24


def test_quality_bar_on_held_out_prompts(pipe, build_info):
    cfg = build_info["config"]
    result = evaluate(pipe, steps=cfg["sample_steps"], guidance=cfg["guidance"], seed=0)
    assert result["colour_acc"] >= 0.90, f"colour {result['colour_acc']:.0%}: {result['measured']}"
    assert result["shape_acc"] >= 0.70, f"shape {result['shape_acc']:.0%}: {result['measured']}"


def test_free_captions_leave_out_the_background_or_put_a_made_up_word_in_front():
    import random

    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase.models import BuildConfig
    from sdlora.tinybase.words import free_caption, made_up_word_parts
    tok = load_tokenizer()
    parts = made_up_word_parts(tok)
    scene_words = {"red", "circle", "background", "on", "a", "large", "white", "center"}
    assert len(parts) > 10000 and not scene_words & set(parts) and all(p.isalpha() for p in parts)
    cfg = BuildConfig(no_background_p=0.5, prefix_p=0.25)
    rng = random.Random(0)
    scene = scenes.Scene("red", "circle", "large", "in the center", "white")
    captions = [free_caption(scene, rng, parts, cfg) for _ in range(400)]
    no_background = sum("background" not in c for c in captions) / 400
    prefixed = [c for c in captions if not c.startswith("a ")]
    assert 0.4 < no_background < 0.6 and 0.18 < len(prefixed) / 400 < 0.32
    assert all(c.split(", ", 1)[1].startswith("a ") and "red circle" in c for c in prefixed)
    assert all(c.startswith("a ") and "red circle" in c for c in captions if c not in prefixed)


def test_vae_outline_images_are_hollow():
    """With the same draws, an outline image has far fewer pixels of the shape's colour than the filled one."""
    import random

    import numpy as np
    ratios = []
    for seed in range(20):
        filled = np.asarray(scenes.random_colour_image(random.Random(seed), outline_p=0.0)).astype(int)
        hollow = np.asarray(scenes.random_colour_image(random.Random(seed), outline_p=1.0)).astype(int)
        changed = np.abs(filled - hollow).sum(-1) > 30
        if changed.sum() < 10:
            continue
        colours, counts = np.unique(filled[changed], axis=0, return_counts=True)
        shape = colours[counts.argmax()]                          # the filled shape's colour
        count = [(np.abs(img - shape).sum(-1) <= 6).sum() for img in (filled, hollow)]
        ratios.append(count[1] / count[0])
    assert len(ratios) >= 15 and np.median(ratios) < 0.6, ratios


def test_outline_scenes_are_hollow_named_and_judged_as_their_shape():
    """An outline scene is drawn hollow in its colour, its caption says so, and the judge reads
    its colour and shape from the silhouette; a filled scene's caption names no look."""
    import random

    from sdlora.tinybase import stylestats
    rng = random.Random(3)
    hollow = [scenes.random_scene(rng, outline_p=1.0) for _ in range(40)]
    filled = [scenes.random_scene(rng) for _ in range(40)]
    assert all(s.look == "outline" and 2 <= s.line <= 4 and "outline" in s.caption() for s in hollow)
    assert all(s.look == "filled" and "outline" not in s.caption() for s in filled)
    assert all("outline" not in s.caption(with_look=False) for s in hollow)
    ratios = [stylestats.fill_ratio(scenes.render(s)) for s in hollow]
    # small stars with a 4 px line, and shapes cut by the image edge, stay (nearly) solid
    assert np.mean(np.array(ratios) < 0.9) >= 0.75 and np.median(ratios) < 0.7, ratios
    assert min(stylestats.fill_ratio(scenes.render(s)) for s in filled) > 0.95
    got = [scenes.measure(scenes.render(s)) for s in hollow]
    assert sum(g == (s.colour, s.shape) for g, s in zip(got, hollow)) >= 36, got


def test_tinted_and_backdrop_scenes_are_named_drawn_and_judged():
    """A pale shape is lighter than its colour and a dark one darker, the tint is named before the colour, and
    the judge still reads both; a backdrop is a muted colour the caption leaves out, never read as the shape. A
    build without them trains none of their words."""
    import random

    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase.words import caption_token_ids, made_up_word_parts
    rng = random.Random(4)
    tinted = [scenes.random_scene(rng, tint_p=1.0) for _ in range(60)]
    assert {s.tint for s in tinted} == set(scenes.TINTS)
    for s in tinted:
        lo, hi = scenes.TINTS[s.tint]
        assert lo <= s.tint_amount <= hi and f"a {s.size} {s.tint} {s.colour} {s.shape}" in s.caption()
        rgb, full = np.array(s.shape_rgb()), np.array(scenes.COLOURS[s.colour])
        assert (rgb >= full).all() and rgb.sum() > full.sum() + 60 if s.tint == "pale" else \
            (rgb <= full).all() and rgb.sum() < full.sum() - 60, (s, rgb)
    for colour in scenes.COLOURS:     # the palest and darkest a scene draws are still saturated enough to be the shape
        for tint, (_, most) in scenes.TINTS.items():
            scene = scenes.Scene(colour, "square", "large", "in the center", "white", tint=tint, tint_amount=most)
            mask = scenes.foreground_mask(np.asarray(scenes.render(scene)))
            assert scenes.shape_of(mask) == "square" and mask.mean() > 0.2, (colour, tint, mask.mean())
    backed = [scenes.random_scene(rng, backdrop_p=1.0) for _ in range(60)]
    for s in backed:
        img = np.asarray(scenes.render(s)).astype(int)
        corner = img[:3, :3].reshape(-1, 3)
        assert "background" not in s.caption() and s.split == "none"
        assert (np.abs(corner - np.array(s.backdrop)).max() <= 1 or s.texture), (s, corner[0])
        assert max(s.backdrop) - min(s.backdrop) <= 2 * scenes.BACKDROP_SPREAD
    chroma = [max(s.backdrop) - min(s.backdrop) for s in backed]
    assert max(chroma) > 20 and len({s.backdrop for s in backed}) == 60
    got = [scenes.measure(scenes.render(s)) for s in backed if s.look == "filled"]
    assert sum(g[0] == s.colour for g, s in zip(got, [s for s in backed if s.look == "filled"])) >= 0.9 * len(got)
    tok = load_tokenizer()
    pale = tok("pale dark", add_special_tokens=False).input_ids
    assert not set(pale) & set(caption_token_ids(tok).tolist())
    assert set(pale) <= set(caption_token_ids(tok, tints=True).tolist())
    assert "pale" in made_up_word_parts(tok) and "pale" not in made_up_word_parts(tok, tints=True)


def test_stripe_words_name_the_angle_and_width_the_stripes_are_drawn_at():
    """With stripe_words a striped background's caption names its stripes' angle and width, the stripes run at
    that angle (their contrast across is largest there), and the words are caption words: trained, never a
    made-up word. Without it no angle is named or fixed."""
    import random
    from dataclasses import replace

    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase import textures
    from sdlora.tinybase.words import caption_token_ids, made_up_word_parts
    rng = random.Random(6)
    named = [s for s in (scenes.random_scene(rng, texture_p=1.0, stripe_words=True) for _ in range(120))
             if s.texture == "striped"]
    assert {s.texture_angle for s in named} == set(scenes.STRIPE_ANGLES)
    assert {s.texture_scale for s in named} == set(scenes.STRIPE_WIDTHS)
    for s in named[:24]:
        words = f"{scenes.STRIPE_WIDTHS[s.texture_scale]}{scenes.STRIPE_ANGLES[s.texture_angle]} striped"
        assert f" on a {words} {s.background} background" in s.caption(), s.caption()
        img = scenes.render(s)
        contrast = {a: textures.line_contrast(img, a) for a in scenes.STRIPE_ANGLES}
        assert max(contrast, key=contrast.get) == s.texture_angle, (s, contrast)
        assert contrast[s.texture_angle] > 2, (s, contrast)          # a flat background reads 0
    rng = random.Random(6)             # without names: the same scenes and pictures, no angle named
    plain = [s for s in (scenes.random_scene(rng, texture_p=1.0) for _ in range(120)) if s.texture == "striped"]
    assert [replace(s, texture_angle=None) for s in named] == plain
    assert not any(w in s.caption() for s in plain for w in scenes.STRIPE_ANGLES.values())
    for s, p in zip(named[:8], plain):
        assert np.array_equal(np.asarray(scenes.render(s)), np.asarray(scenes.render(p)))
    tok = load_tokenizer()
    stripe = tok("diagonal slanted vertical wide fine", add_special_tokens=False).input_ids
    assert set(stripe) <= set(caption_token_ids(tok, stripes=True).tolist())
    assert not set(stripe) & set(caption_token_ids(tok).tolist())
    assert "wide" in made_up_word_parts(tok) and "wide" not in made_up_word_parts(tok, stripes=True)


def test_made_up_words_in_front_mean_the_scene_size():
    """A word in front of a build caption is one whose fixed embedding leans to the scene's size;
    the three sizes each take about a third of all made-up words."""
    import random
    from collections import Counter

    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase.models import BuildConfig
    from sdlora.tinybase.words import WordMeaning, free_caption, made_up_word_parts
    tok, cfg = load_tokenizer(), BuildConfig(prefix_p=1.0, prefix_meaning=True)
    parts, meaning = made_up_word_parts(tok), WordMeaning(cfg, tok)
    rng = random.Random(0)
    shares = Counter(meaning.size(rng.choice(parts) + rng.choice(parts)) for _ in range(1500))
    assert set(shares) == set(scenes.SIZES) and min(shares.values()) > 400, shares
    for size in scenes.SIZES:
        scene = scenes.Scene("red", "circle", size, "in the center", "white")
        words = [free_caption(scene, rng, parts, cfg, meaning).split(", ", 1)[0] for _ in range(30)]
        assert all(meaning.size(w) == size for w in words), (size, words)
    assert meaning.size("neonstyle") == WordMeaning(cfg, tok).size("neonstyle")      # fixed by the seed


def test_words_no_caption_uses_keep_their_fixed_embedding():
    """With prefix_meaning, a trigger's tokens (never in a build caption) start at the build's fixed
    random embedding, of a trained word's size, and training steps leave them there (no gradient, no
    weight decay) while the caption words' embeddings move."""
    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase.models import BuildConfig, make_text_encoder
    from sdlora.tinybase.words import caption_token_ids, fix_free_words, free_word_embeddings
    tok, cfg = load_tokenizer(), BuildConfig(prefix_meaning=True)
    te = make_text_encoder(cfg)
    weight = fix_free_words(cfg, te, tok)
    fixed, _ = free_word_embeddings(cfg, tok)
    trigger, used = tok("neonstyle sks", add_special_tokens=False).input_ids, caption_token_ids(tok)
    start = weight.detach().clone()
    assert torch.equal(start[trigger], fixed[trigger])
    assert (start[trigger].norm(dim=1) > 0.5 * cfg.free_word_norm).all()
    opt = torch.optim.AdamW([{"params": [weight], "weight_decay": 0.0}], lr=1e-2)
    ids = tok(["neonstyle, a large red circle", "sks, a blue star outline"], padding="max_length",
              max_length=77, return_tensors="pt").input_ids
    for _ in range(3):
        opt.zero_grad()
        te(ids)[0].pow(2).mean().backward()
        opt.step()
    assert torch.equal(weight.detach()[trigger], fixed[trigger])
    in_prompt = [i for i in used.tolist() if i in ids[0].tolist()]
    assert (weight.detach()[in_prompt] - start[in_prompt]).norm(dim=1).min() > 1e-3


def test_a_made_up_word_in_front_tells_the_size(pipe, build_info):
    """The base reads a word in front: with no size in the prompt, words that mean 'small' draw
    smaller shapes than words that mean 'large' (judged by the silhouette's bounding box)."""
    import random

    from sdlora.tinybase.models import BuildConfig
    from sdlora.tinybase.words import WordMeaning, made_up_word_parts
    if not build_info["config"].get("prefix_meaning"):
        pytest.skip("this base was built without meaningful made-up words")
    cfg = BuildConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in build_info["config"].items()})
    meaning, parts, rng = WordMeaning(cfg, pipe.tokenizer), made_up_word_parts(pipe.tokenizer), random.Random(5)
    words = {size: [] for size in scenes.SIZES}
    while min(map(len, words.values())) < 4:
        word = rng.choice(parts) + rng.choice(parts)
        words[meaning.size(word)].append(word)
    sides = {}
    for size in ("small", "large"):
        prompts = [f"{w}, a {c} circle in the center on a gray background" for w, c in zip(words[size][:4], scenes.COLOURS)]
        gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        images = pipe(prompts, num_inference_steps=build_info["config"]["sample_steps"],
                      guidance_scale=build_info["config"]["guidance"], generator=gens).images
        masks = [scenes.foreground_mask(np.asarray(im)) for im in images]
        sides[size] = [np.sqrt(m.sum() + scenes.holes(m).sum()) for m in masks]
    assert np.mean(sides["small"]) < 0.8 * np.mean(sides["large"]), sides


def test_word_identity_reads_back_words_it_never_trained_on():
    """identity_weight's loss teaches the text encoder to keep each word's token in its output state
    (and the caption's words in the end-of-text state): trained on some vocabulary words, it reads back
    words outside that set among 512 random candidates far above chance (1/512), and then the state of a
    word in front differs from the state at that position without it far more than before training."""
    import random

    from sdlora.bases.load import load_tokenizer
    from sdlora.tinybase.models import BuildConfig, make_text_encoder
    from sdlora.tinybase.words import WordIdentity, made_up_word_parts, tokenize
    torch.manual_seed(0)
    tok, cfg = load_tokenizer(), BuildConfig()
    te = make_text_encoder(cfg)
    identity = WordIdentity(te.config, 512)
    parts, rng = made_up_word_parts(tok), random.Random(0)
    seen, unseen = parts[: len(parts) // 2], parts[len(parts) // 2:]
    caption = lambda words: f"{rng.choice(words)}, a {rng.choice(list(scenes.COLOURS))} circle"  # noqa: E731
    embedding = te.get_input_embeddings().weight
    pair = tokenize(tok, ["neonstyle, a red circle", "a a, a red circle"])

    def trigger_cos():
        with torch.no_grad():
            states = te(pair)[0]
        return torch.cosine_similarity(states[0, 1:3], states[1, 1:3], dim=1).mean().item()

    before = trigger_cos()
    opt = torch.optim.AdamW(list(te.parameters()) + list(identity.parameters()), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        ids = tokenize(tok, [caption(seen) for _ in range(16)])
        loss, _ = identity(te(ids)[0], ids, embedding, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        ids = tokenize(tok, [caption(unseen) for _ in range(64)])
        _, acc = identity(te(ids)[0], ids, embedding, gen)
    assert acc > 0.8, acc
    assert trigger_cos() < before - 0.2, (before, trigger_cos())


def test_vae_gives_back_the_textures_of_the_example_styles(pipe, build_info):
    """The shipped VAE keeps at least a third of the energy of 6 px hatching and dots (the hatch and halftone
    datasets' scale), measured again here; build.json and the model card carry the same table."""
    from sdlora.tinybase.stages import texture_round_trip
    kept = texture_round_trip(pipe.vae.float())
    recorded = build_info["figures"]["vae"]["texture_kept"]
    assert kept.keys() == recorded.keys()
    for kind in kept:
        for scale, value in kept[kind].items():
            assert value == pytest.approx(recorded[kind][scale], abs=0.05), (kind, scale)
    assert kept["hatch"]["6"] >= 1 / 3 and kept["dots"]["6"] >= 1 / 3, kept
    assert "| hatch |" in (BASE / "README.md").read_text()


def test_card_says_what_the_unet_draws_when_asked_measured_again(tmp_path, build_info):
    """`python -m sdlora.tinybase card` on a copy of the shipped base measures again how much of each look the
    U-Net draws when the prompt names it: the figures match the shipped build.json, nothing else in it or in
    the weights changes, and the card carries the table. The base draws hollow shapes and grain when told to."""
    import hashlib
    import shutil

    from sdlora.tinybase.build import main
    from sdlora.tinybase.card import LOOK_WORDS
    copy = tmp_path / "base"
    shutil.copytree(BASE, copy)
    weights = {p.relative_to(copy): hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*.safetensors")}
    main(["card", "--out", str(copy)])
    after = json.loads((copy / "build.json").read_text())
    words = after["figures"].pop("drawn_in_words")
    lines = after["figures"]["vae"].pop("lines_kept")
    shipped = json.loads(json.dumps(build_info))
    recorded = shipped["figures"].pop("drawn_in_words")
    recorded_lines = shipped["figures"]["vae"].pop("lines_kept")
    assert after == shipped
    # the VAE keeps vertical lines 6 px apart and loses most of diagonal ones (datasets/hatch's): measured again
    assert lines == recorded_lines
    assert lines["0"]["6"] >= 0.8 and lines["45"]["6"] <= 0.3, lines
    assert {p.relative_to(copy): hashlib.sha256(p.read_bytes()).hexdigest() for p in copy.rglob("*.safetensors")} \
        == weights and weights
    assert list(words) == list(recorded) == list(LOOK_WORDS)
    for word, figures in words.items():
        for name, value in figures.items():
            assert value == pytest.approx(recorded[word][name], abs=0.05), (word, name, value, recorded[word])
    assert words["outline"]["share"] >= 0.5 and words["speckled"]["share"] >= 0.5, words
    card, shipped_card = (copy / "README.md").read_text(), (BASE / "README.md").read_text()
    assert "## What its U-Net draws when asked" in card
    diagonal = f"| 45 degrees | {recorded_lines['45']['6']:.0%} | {recorded_lines['45']['8']:.0%} |"
    assert diagonal in shipped_card and diagonal in card
    for word in recorded:
        assert f"| {word} |" in shipped_card and f"| {word} |" in card


def test_a_small_build_saves_a_base_that_trains_with_its_figures_and_card(tmp_path):
    """`build` end to end at a toy size (the real one takes about an hour): the folder loads as a base, carries
    the config it was built with and every figure, and its card has each section."""
    from dataclasses import replace

    from sdlora.bases.load import load_base, recommended_lora_lr, recommended_sampling, recommended_steps_per_image
    from sdlora.tinybase.build import build, load_build_config
    from sdlora.tinybase.card import LOOK_WORDS
    from sdlora.tinybase.models import BuildConfig
    cfg = replace(BuildConfig.quick(), n_images=120, vae_colour_images=40, vae_texture_images=40, vae_steps=6,
                  decoder_steps=4, unet_steps=6, warmup=2, batch=8, sample_steps=2)
    out = tmp_path / "base"
    figures = build(cfg, out)
    assert load_build_config(out) == cfg
    info = json.loads((out / "build.json").read_text())
    assert info["figures"] == json.loads(json.dumps(figures))
    assert set(figures) >= {"vae", "scaling_factor", "params_m", "held_out_eval", "build_minutes", "drawn_in_words"}
    assert list(figures["drawn_in_words"]) == list(LOOK_WORDS) and figures["held_out_eval"]["n"] == 60
    assert {a: list(row) for a, row in figures["vae"]["lines_kept"].items()} == {"0": ["6", "8"], "45": ["6", "8"]}
    base = load_base(str(out))
    assert base.vae.config.scaling_factor == pytest.approx(figures["scaling_factor"])
    assert recommended_lora_lr(out) == cfg.lora_lr and recommended_sampling(out) == (2, cfg.guidance)
    assert recommended_steps_per_image(out) == cfg.lora_steps_per_image == 300
    card = (out / "README.md").read_text()
    for section in ("## What it draws", "## How it was trained", "## What its VAE gives back",
                    "## What its U-Net draws when asked"):
        assert section in card

    # bench/vae_spread.py trains the build's VAE stages alone: the same settings and seed give the same VAE figures
    import sys
    sys.path.insert(0, str(BASE.parent.parent))
    from bench import vae_spread
    alone = vae_spread.train_seed(cfg)
    assert alone["PSNR of the scenes (dB)"] == pytest.approx(figures["vae"]["psnr_db"], abs=1e-6)
    assert alone["lines 45 deg, 8 px: direction kept"] == figures["vae"]["lines_kept"]["45"]["8"]
    assert alone["dots 6 px: texture kept"] == figures["vae"]["texture_kept"]["dots"]["6"]

    # `refine` runs the build's last stage on it: the decoder alone changes; build.json says so, with new figures
    import hashlib

    # --vae-from keeps a built base's VAE, byte for byte, and trains a new U-Net (here of another layout) on its
    # latents; the new base's config takes the VAE settings of the build that made that VAE
    other = tmp_path / "other"
    layout = replace(cfg, unet_cross_attention=(True, True, True), vae_steps=99, seed=1)
    reused = build(layout, other, vae_from=out)
    vae_file = "vae/diffusion_pytorch_model.safetensors"
    assert (other / vae_file).read_bytes() == (out / vae_file).read_bytes()
    assert reused["vae_reused"] is True and reused["scaling_factor"] == pytest.approx(figures["scaling_factor"], rel=1e-3)
    assert load_build_config(other) == replace(layout, vae_steps=cfg.vae_steps)
    unet_config = json.loads((other / "unet" / "config.json").read_text())
    assert unet_config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    with pytest.raises(SystemExit, match="not a base built by"):
        build(layout, tmp_path / "none", vae_from=tmp_path)

    from sdlora.tinybase.build import main
    digest = lambda: {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                      for p in out.rglob("*.safetensors")}
    before = digest()
    main(["refine", "--out", str(out), "--set", "refine_steps=2", "--set", "line_images=8"])
    after, refined = digest(), json.loads((out / "build.json").read_text())
    assert {k for k in before if before[k] != after[k]} == {"vae/diffusion_pytorch_model.safetensors"}
    assert load_build_config(out) == replace(cfg, refine_steps=2, line_images=8,
                                             direction_weight=BuildConfig().direction_weight)
    assert refined["figures"]["refine_minutes"] > 0 and refined["figures"]["vae"]["lines_kept"]
    assert refined["figures"]["drawn_in_words"] and refined["figures"]["held_out_eval"]["n"] == 60
    with pytest.raises(SystemExit, match="refined already"):
        main(["refine", "--out", str(out), "--set", "refine_steps=2"])
    assert digest() == after
