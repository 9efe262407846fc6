"""LoRA files from elsewhere on the tiny random base: more modules, LoCon, DoRA, diffusers layout,
mixing with separate U-Net / text-encoder strengths, the wrong base family, unusable keys."""
from __future__ import annotations

import pytest
import torch

from sdlora.loras import diffusers_layout

from sdlora.loras import layouts as formats
from sdlora.loras.layouts import LoraWeights
from sdlora.generate import Generator, LoraChoice


def rand(g, *shape, scale=0.1):
    return torch.randn(*shape, generator=g) * scale


def community_loras(base, seed=0, rank=4, dora=False) -> formats.LoraSet:
    """What community kohya files hold beyond ours: self-attention, feed-forward, proj_in/out,
    3x3 conv (LoCon) in resnets, and the text encoder's MLP."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in base.unet.named_modules():
        wanted = name.endswith(("attn1.to_q", "attn2.to_v", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                                "resnets.0.conv1"))
        if not wanted:
            continue
        if isinstance(m, torch.nn.Conv2d):
            kh, kw = m.kernel_size
            w = LoraWeights(down=rand(g, rank, m.in_channels, kh, kw), up=rand(g, m.out_channels, rank, 1, 1), alpha=2.0)
        else:
            w = LoraWeights(down=rand(g, rank, m.in_features), up=rand(g, m.out_features, rank), alpha=2.0,
                            dora_scale=(m.weight.norm(dim=1, keepdim=True) * 1.1) if dora else None)
        out["unet." + name] = w
    for name, m in base.text_encoder.named_modules():
        if name.endswith(("mlp.fc1", "mlp.fc2")):
            out["text_encoder." + name] = LoraWeights(down=rand(g, rank, m.in_features),
                                                      up=rand(g, m.out_features, rank), alpha=8.0)
    return out


def save(path, sd, meta=None):
    formats.save_lora_file(path, sd, meta or {})
    return str(path)


def unet_out(base):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return base.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300]),
                         torch.randn(1, 77, 32, generator=g)).sample


def te_out(base):
    with torch.no_grad():
        return base.text_encoder(torch.tensor([[49406, 320, 1125, 49407]]))[0]


def test_community_kohya_file_with_locon_ff_proj_and_te_mlp_loads_fully(tiny_base, tmp_path):
    loras = community_loras(tiny_base)
    sd = formats.to_kohya(loras, dtype=torch.float32)
    sd["lora_unet_not_a_module_anywhere.lora_down.weight"] = torch.zeros(4, 8)
    sd["lora_unet_not_a_module_anywhere.lora_up.weight"] = torch.zeros(8, 4)
    path = save(tmp_path / "community.safetensors", sd)
    gen = Generator(tiny_base)
    base_u, base_t = unet_out(tiny_base), te_out(tiny_base)
    [loaded] = gen.set_loras([LoraChoice(path, 1.0)])
    assert set(loaded.loras) == set(loras)                                   # every real module used
    assert any("not_a_module_anywhere" in k for k in loaded.unused)          # the rest listed, not dropped
    assert any(k.endswith("conv1") for k in loaded.loras)
    unfused_u, unfused_t = unet_out(tiny_base), te_out(tiny_base)
    assert (unfused_u - base_u).abs().max() > 1e-3 and (unfused_t - base_t).abs().max() > 1e-3
    gen.set_loras([LoraChoice(path, 1.0)], fused=True)                       # LoCon fused == unfused too
    assert torch.allclose(unet_out(tiny_base), unfused_u, atol=1e-4)
    assert torch.allclose(te_out(tiny_base), unfused_t, atol=1e-4)
    gen.set_loras([])
    assert torch.equal(unet_out(tiny_base), base_u)


def test_separate_unet_and_text_encoder_strengths_and_negative_strength(tiny_base, tmp_path):
    path = save(tmp_path / "c.safetensors", formats.to_kohya(community_loras(tiny_base), dtype=torch.float32))
    gen = Generator(tiny_base)
    base_u, base_t = unet_out(tiny_base), te_out(tiny_base)
    gen.set_loras([LoraChoice(path, 1.0, 0.0)])
    assert torch.equal(te_out(tiny_base), base_t) and not torch.equal(unet_out(tiny_base), base_u)
    gen.set_loras([LoraChoice(path, 0.0, 1.0)])
    assert torch.equal(unet_out(tiny_base), base_u) and not torch.equal(te_out(tiny_base), base_t)
    gen.set_loras([LoraChoice(path, -1.0)], fused=True)
    key = next(k for k in gen.stack._orig if k.endswith("attn2.to_v"))
    w = gen.load(path).loras[key]
    expected = gen.stack._orig[key] - (w.alpha / w.rank) * (w.up @ w.down)
    assert torch.allclose(gen.stack.module(key).weight, expected, atol=1e-6)


def test_mixing_two_files_adds_their_updates(tiny_base, tmp_path):
    a = save(tmp_path / "a.safetensors", formats.to_kohya(community_loras(tiny_base, seed=1), dtype=torch.float32))
    b = save(tmp_path / "b.safetensors", formats.to_kohya(community_loras(tiny_base, seed=2), dtype=torch.float32))
    gen = Generator(tiny_base)
    gen.set_loras([LoraChoice(a, 0.6), LoraChoice(b, -0.4)], fused=True)
    key = next(k for k in gen.stack._orig if k.endswith("ff.net.2"))
    wa, wb = gen.load(a).loras[key], gen.load(b).loras[key]
    d = lambda w: (w.alpha / w.rank) * (w.up @ w.down)  # noqa: E731
    assert torch.allclose(gen.stack.module(key).weight, gen.stack._orig[key] + 0.6 * d(wa) - 0.4 * d(wb), atol=1e-6)


def test_dora_file_applies_and_strength_zero_is_base(tiny_base, tmp_path):
    loras = {k: v for k, v in community_loras(tiny_base, dora=True).items() if v.dora_scale is not None}
    path = save(tmp_path / "dora.safetensors", formats.to_kohya(loras, dtype=torch.float32))
    gen = Generator(tiny_base)
    base_u = unet_out(tiny_base)
    gen.set_loras([LoraChoice(path, 0.0)])
    assert torch.equal(unet_out(tiny_base), base_u)
    gen.set_loras([LoraChoice(path, 1.0)])
    key = next(iter(loras))
    w, w0 = loras[key], gen.stack._orig[key]
    merged = w0 + (w.alpha / w.rank) * (w.up @ w.down)
    expected = merged * (w.dora_scale / merged.norm(dim=1, keepdim=True))   # DoRA: rows rescaled to the magnitude
    assert torch.allclose(gen.stack.module(key).weight, expected, atol=1e-5)


def test_diffusers_layout_file_gives_the_same_weights_as_kohya(tiny_base, tmp_path):
    loras = community_loras(tiny_base)
    loras = {k: v for k, v in loras.items() if v.down.dim() == 2}
    k_path = save(tmp_path / "k.safetensors", formats.to_kohya(loras, dtype=torch.float32))
    sd, meta = diffusers_layout.to_diffusers(loras, dtype=torch.float32)
    d_path = save(tmp_path / "d.safetensors", sd, meta)
    gen = Generator(tiny_base)
    gen.set_loras([LoraChoice(k_path, 0.7)], fused=True)
    kohya_w = {k: gen.stack.module(k).weight.clone() for k in loras}
    gen.set_loras([LoraChoice(d_path, 0.7)], fused=True)
    for k in loras:
        assert torch.allclose(gen.stack.module(k).weight, kohya_w[k], atol=1e-6), k


def test_sdxl_lora_on_sd1_base_names_both_families(tiny_base, tmp_path):
    sd = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(4, 2048),
          "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 4),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
    path = save(tmp_path / "xl.safetensors", sd)
    with pytest.raises(formats.LoraFileError, match=r"SDXL.*SD 1\.x"):
        Generator(tiny_base).set_loras([LoraChoice(path)])


def test_pickle_lora_refused_with_advice(tiny_base, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"x": torch.zeros(1)}, path)
    with pytest.raises(formats.LoraFileError, match=r"old\.ckpt.*(safetensors)"):
        Generator(tiny_base).set_loras([LoraChoice(str(path))])
