"""Generation with LoRAs: determinism, strength 0 == base, and the same weights as diffusers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlora import GenerateConfig, Generator, LoraChoice
from sdlora.loras import layouts as formats
from sdlora.training import adapters as lora_mod
from sdlora.loras.layouts import LoraWeights


def write_lora(base, path, rank=4, alpha=2.5, seed=3, te=False):
    """A random non-zero LoRA file for the base's attn2 modules (and text encoder)."""
    g = torch.Generator().manual_seed(seed)
    loras = {}
    comps = [("unet", base.unet, ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]
    if te:
        comps.append(("text_encoder", base.text_encoder, ("q_proj", "k_proj", "v_proj", "out_proj")))
    for comp, model, suffixes in comps:
        for name in lora_mod.target_names(model, suffixes):
            m = model.get_submodule(name)
            loras[f"{comp}.{name}"] = LoraWeights(down=torch.randn(rank, m.in_features, generator=g) * 0.2,
                                                  up=torch.randn(m.out_features, rank, generator=g) * 0.2,
                                                  alpha=alpha)
    formats.save_lora_file(path, formats.to_kohya(loras, dtype=torch.float32), {"ss_network_dim": str(rank)})
    return path


def pixels(img):
    return np.asarray(img).astype(np.int16)


@pytest.fixture
def gen(tiny_base):
    return Generator(tiny_base)


def test_same_seed_same_image_and_strength_zero_is_base(gen, tmp_path):
    cfg = GenerateConfig(prompt="a red circle", seed=3, steps=4)
    plain = pixels(gen.generate(cfg))
    assert np.array_equal(plain, pixels(gen.generate(cfg)))
    path = write_lora(gen.base, tmp_path / "a.safetensors")
    assert np.array_equal(plain, pixels(gen.generate(cfg, [LoraChoice(str(path), 0.0)])))
    assert np.array_equal(plain, pixels(gen.generate(cfg, [LoraChoice(str(path), 0.0)], fused=True)))
    one = pixels(gen.generate(cfg, [LoraChoice(str(path), 1.0)]))
    assert np.abs(one - plain).max() > 0


def test_strength_change_never_reloads_base(gen, tmp_path, monkeypatch):
    path = write_lora(gen.base, tmp_path / "a.safetensors")
    cfg = GenerateConfig(prompt="x", steps=2)
    gen.generate(cfg, [LoraChoice(str(path), 0.5)])
    import sdlora.generate as g
    import sdlora.bases.load as m
    monkeypatch.setattr(m, "_load", lambda name: (_ for _ in ()).throw(AssertionError("base reloaded")))
    monkeypatch.setattr(g, "read_lora", lambda *a, **k: (_ for _ in ()).throw(AssertionError("file re-read")))
    unet_id = id(gen.base.unet)
    for s in (0.1, 0.9, -0.5, 2.0):
        gen.generate(cfg, [LoraChoice(str(path), s)])
    assert id(gen.base.unet) == unet_id


def test_sweep_gives_one_image_per_strength(gen, tmp_path):
    path = write_lora(gen.base, tmp_path / "a.safetensors")
    imgs = gen.sweep(GenerateConfig(prompt="x", steps=2, seed=1), LoraChoice(str(path)))
    assert len(imgs) == 5
    assert np.array_equal(pixels(imgs[0]), pixels(gen.generate(GenerateConfig(prompt="x", steps=2, seed=1), [])))


def test_many_requests_are_drawn_in_batches_each_as_generate_draws_it(gen, tmp_path, monkeypatch):
    """generate_many: one pipeline call per group of requests that share steps, guidance, size and whether they have a
    negative prompt (split at generate.MAX_BATCH), each image in its request's place and within a level of 255 of
    generate()'s for the same request."""
    from sdlora import generate
    assert [generate.batch_size(side, side) for side in (64, 512, 1024)] == [16, 4, 1]
    path = write_lora(gen.base, tmp_path / "a.safetensors")
    cfgs = [GenerateConfig(prompt="a red star", seed=1, steps=3),
            GenerateConfig(prompt="a blue circle", seed=2, steps=3),
            GenerateConfig(prompt="a red star", seed=3, steps=3),
            GenerateConfig(prompt="a red star", seed=4, steps=3, width=32, height=64),
            GenerateConfig(prompt="a red star", negative_prompt="blurry", seed=1, steps=3),
            GenerateConfig(prompt="a green square", seed=5, steps=3)]
    choice = [LoraChoice(str(path), 0.7)]
    one = [pixels(gen.generate(c, choice)) for c in cfgs]
    batches = []
    call = type(gen.pipe).__call__

    def counted(pipe, *args, **kwargs):
        batches.append(len(kwargs["prompt"]))
        return call(pipe, *args, **kwargs)

    monkeypatch.setattr(type(gen.pipe), "__call__", counted)
    for most, expected in ((16, [4, 1, 1]), (3, [3, 1, 1, 1])):
        monkeypatch.setattr(generate, "MAX_BATCH", most)
        batches.clear()
        many = [pixels(im) for im in gen.generate_many(cfgs, choice)]
        assert batches == expected
        assert [m.shape for m in many] == [o.shape for o in one] and one[3].shape == (64, 32, 3)
        for i, m in enumerate(many):
            gaps = [np.abs(m - o).max() if m.shape == o.shape else 255 for o in one]
            assert gaps[i] <= 1 and min(g for j, g in enumerate(gaps) if j != i) > 1, (i, gaps)


def test_a_batch_the_device_has_no_memory_for_is_drawn_one_image_at_a_time():
    """Calibration draws at the end of a run with training's state still on the GPU: a batch that does not fit is drawn
    again image by image, in order, and only a single image that does not fit is an error."""
    from types import SimpleNamespace
    from sdlora.generate import draw_batch
    calls = []

    def pipe(prompt, generator, **kwargs):
        calls.append(len(prompt))
        if len(prompt) > 1 or prompt[0] == "huge":
            raise torch.OutOfMemoryError("out of memory")
        return SimpleNamespace(images=[f"{prompt[0]} {int(torch.randint(100, (1,), generator=generator[0]))}"])

    expected = [f"p{i} {int(torch.randint(100, (1,), generator=torch.Generator().manual_seed(i)))}" for i in range(5)]
    assert draw_batch(pipe, [f"p{i}" for i in range(5)], list(range(5)), 2, 5.0, 64, 64) == expected
    assert calls == [5, 1, 1, 1, 1, 1]                     # tiny's 64 px: all 5 in one call, then one by one
    with pytest.raises(torch.OutOfMemoryError):
        draw_batch(pipe, ["huge"], [0], 2, 5.0, 64, 64)


def test_lora_choice_parse():
    assert LoraChoice.parse("a.safetensors") == LoraChoice("a.safetensors", 1.0, None)
    assert LoraChoice.parse("a.safetensors:0.8") == LoraChoice("a.safetensors", 0.8, None)
    assert LoraChoice.parse("C:/x/a.safetensors:0.8:-0.5") == LoraChoice("C:/x/a.safetensors", 0.8, -0.5)


def test_our_weights_equal_diffusers_load_lora_weights_at_0_8(tiny_base, tmp_path):
    """diffusers' own loader + set_adapters(0.8) + fuse gives the weights our generator fuses at 0.8."""
    from diffusers import StableDiffusionPipeline
    from sdlora.generate import make_pipeline
    path = write_lora(tiny_base, tmp_path / "ours.safetensors", rank=4, alpha=2.5, te=True)
    original = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    gen = Generator(tiny_base)
    gen.set_loras([LoraChoice(str(path), 0.8)], fused=True)
    ours = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    ours_te = {k: v.clone() for k, v in tiny_base.text_encoder.state_dict().items()}
    gen.set_loras([])
    pipe: StableDiffusionPipeline = make_pipeline(tiny_base)
    pipe.load_lora_weights(str(path), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.8])
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    theirs = tiny_base.unet.state_dict()
    for k, v in ours.items():
        assert torch.allclose(v, theirs[k], atol=1e-5), k
    theirs_te = tiny_base.text_encoder.state_dict()
    for k, v in ours_te.items():
        assert torch.allclose(v, theirs_te[k], atol=1e-5), k
    moved = [k for k in ours if not torch.allclose(ours[k], original[k], atol=1e-4)]
    assert len(moved) == 28 and all(".attn2." in k for k in moved)     # the LoRA really changed 28 weights


def test_generators_of_one_base_keep_their_own_loras_and_fused_mode(tiny_base, tmp_path):
    """Two Generators share a cached base's modules: each draws with the LoRAs it set, and one set as fused
    stays fused (and is not re-applied) while no other Generator touches the base."""
    path = write_lora(tiny_base, tmp_path / "l.safetensors")
    cfg = GenerateConfig(prompt="a red circle", seed=1, steps=3)
    a, b = Generator(tiny_base), Generator(tiny_base)
    bare = pixels(b.generate(cfg, []))
    a.set_loras([LoraChoice(str(path), 1.0)], fused=True)
    calls = []
    real_set = a.stack.set
    a.stack.set = lambda *args, **kw: (calls.append(kw), real_set(*args, **kw))[1]
    with_lora = pixels(a.generate(cfg))
    assert calls == [] and a.stack.fused                          # nothing re-applied, still fused
    assert not np.array_equal(with_lora, bare)
    assert np.array_equal(pixels(b.generate(cfg)), bare)            # b re-applies its own (none)
    assert np.array_equal(pixels(a.generate(cfg)), with_lora) and calls[-1] == {"fused": True}
