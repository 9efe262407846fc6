"""LoRA injection through PEFT, and the generation-time stack: equivalences on tiny models."""
from __future__ import annotations

import torch

from sdlora.config import LoraSpec
from sdlora.training import adapters as lora_mod
from sdlora.loras.layouts import LoraWeights
from sdlora.loras.apply import Applied, LoraStack


def unet_out(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    enc = torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        return base.unet(x, torch.tensor([500]), enc).sample


def test_injected_modules_are_exactly_the_targets(tiny_base):
    kv = lora_mod.inject(tiny_base.unet, tiny_base.text_encoder, LoraSpec(rank=4, cross_attention="kv"))
    assert len(kv["unet"]) == 14 and {n.rsplit("attn2.", 1)[1] for n in kv["unet"]} == {"to_k", "to_v"}
    from sdlora.bases.load import tiny_random_base
    tiny_base = tiny_random_base()
    adapted = lora_mod.inject(tiny_base.unet, tiny_base.text_encoder, LoraSpec(rank=4))   # the default: q/k/v/out
    # 7 transformer blocks (2 down, 1 mid, 2 up blocks x 2) x attn2 q/k/v/out.0
    assert len(adapted["unet"]) == 28
    assert all(".attn2." in n for n in adapted["unet"])
    assert {n.rsplit("attn2.", 1)[1] for n in adapted["unet"]} == {"to_q", "to_k", "to_v", "to_out.0"}
    peft_layers = {n for n, m in tiny_base.unet.named_modules() if hasattr(m, "lora_A")}
    assert peft_layers == set(adapted["unet"])
    assert "text_encoder" not in adapted


def test_self_attention_and_text_encoder_options(tiny_base):
    adapted = lora_mod.inject(tiny_base.unet, tiny_base.text_encoder,
                              LoraSpec(rank=4, cross_attention="qkvo", self_attention=True, text_encoder=True))
    assert len(adapted["unet"]) == 56
    assert sum(".attn1." in n for n in adapted["unet"]) == 28
    assert len(adapted["text_encoder"]) == 2 * 4           # 2 layers x q/k/v/out_proj
    assert all(n.endswith(("q_proj", "k_proj", "v_proj", "out_proj")) for n in adapted["text_encoder"])


def test_zero_initialised_lora_equals_base(tiny_base):
    before = unet_out(tiny_base)
    lora_mod.inject(tiny_base.unet, None, LoraSpec(rank=4, alpha=2.0))
    after = unet_out(tiny_base)
    assert torch.equal(before, after)
    # B is zero but A is not: the update is zero only because B starts at zero
    loras = lora_mod.extract(tiny_base.unet, "unet", LoraSpec(rank=4, alpha=2.0))
    w = next(iter(loras.values()))
    assert w.up.abs().sum() == 0 and w.down.abs().sum() > 0 and w.alpha == 2.0


def test_adapters_off_runs_the_frozen_base_and_restores_the_lora(tiny_base):
    before = unet_out(tiny_base)
    lora_mod.inject(tiny_base.unet, None, LoraSpec(rank=4))
    params = lora_mod.lora_parameters(tiny_base.unet)
    with torch.no_grad():
        for name, p in tiny_base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    adapted = unet_out(tiny_base)
    assert (adapted - before).abs().max() > 1e-3
    with lora_mod.adapters_off(tiny_base.unet, None):
        assert torch.equal(unet_out(tiny_base), before)
    assert torch.equal(unet_out(tiny_base), adapted)
    assert all(p.requires_grad for p in params)                # still trainable after the block


def test_extract_then_remove_restores_modules(tiny_base):
    names_before = {n for n, _ in tiny_base.unet.named_modules()}
    lora_mod.inject(tiny_base.unet, None, LoraSpec(rank=2))
    lora_mod.remove_adapters(tiny_base.unet)
    assert {n for n, _ in tiny_base.unet.named_modules()} == names_before


def test_rslora_alpha_exported_so_that_alpha_over_rank_gives_the_trained_scale(tiny_base):
    spec = LoraSpec(rank=16, alpha=4.0, use_rslora=True)
    lora_mod.inject(tiny_base.unet, None, spec)
    w = next(iter(lora_mod.extract(tiny_base.unet, "unet", spec).values()))
    assert abs(w.alpha / w.rank - 4.0 / 16 ** 0.5) < 1e-9


def random_loras(base, rank=4, alpha=3.0, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in lora_mod.target_names(base.unet, ("attn2.to_q", "attn2.to_v")):
        m = base.unet.get_submodule(name)
        out["unet." + name] = LoraWeights(down=torch.randn(rank, m.in_features, generator=g) * scale,
                                          up=torch.randn(m.out_features, rank, generator=g) * scale, alpha=alpha)
    return out


def test_stack_strength_zero_is_exactly_base(tiny_base):
    base_out = unet_out(tiny_base)
    stack = LoraStack({"unet": tiny_base.unet, "text_encoder": tiny_base.text_encoder})
    stack.set([Applied("a", random_loras(tiny_base), 0.0)])
    assert torch.equal(unet_out(tiny_base), base_out)
    stack.set([Applied("a", random_loras(tiny_base), 0.0)], fused=True)
    assert torch.equal(unet_out(tiny_base), base_out)


def test_stack_fused_equals_unfused_and_matches_formula(tiny_base):
    loras = random_loras(tiny_base)
    base_out = unet_out(tiny_base)
    stack = LoraStack({"unet": tiny_base.unet, "text_encoder": tiny_base.text_encoder})
    stack.set([Applied("a", loras, 0.8)], fused=False)
    unfused = unet_out(tiny_base)
    stack.set([Applied("a", loras, 0.8)], fused=True)
    fused = unet_out(tiny_base)
    assert (unfused - base_out).abs().max() > 1e-4            # the LoRA does something
    assert torch.allclose(unfused, fused, atol=1e-5)
    key = next(iter(loras))
    w = loras[key]
    expected = stack._orig[key] + 0.8 * (w.alpha / w.rank) * (w.up @ w.down)
    assert torch.allclose(stack.module(key).weight, expected, atol=1e-6)


def test_hundred_fuse_cycles_leave_base_bit_identical(tiny_base):
    originals = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    stack = LoraStack({"unet": tiny_base.unet, "text_encoder": tiny_base.text_encoder})
    a, b = random_loras(tiny_base, seed=1), random_loras(tiny_base, seed=2, rank=2)
    for i in range(100):
        stack.set([Applied("a", a, 0.3 + i / 100), Applied("b", b, -0.5)], fused=True)
        stack.set([Applied("a", a, 1.7 - i / 100)], fused=i % 2 == 0)
    stack.clear()
    for k, v in tiny_base.unet.state_dict().items():
        assert torch.equal(v, originals[k]), k


def test_two_loras_add_up(tiny_base):
    a, b = random_loras(tiny_base, seed=1), random_loras(tiny_base, seed=2)
    stack = LoraStack({"unet": tiny_base.unet, "text_encoder": tiny_base.text_encoder})
    stack.set([Applied("a", a, 0.5), Applied("b", b, -0.7)], fused=True)
    key = next(iter(a))
    d = lambda w: (w.alpha / w.rank) * (w.up @ w.down)  # noqa: E731
    expected = stack._orig[key] + 0.5 * d(a[key]) - 0.7 * d(b[key])
    assert torch.allclose(stack.module(key).weight, expected, atol=1e-6)


def test_stack_refuses_lora_for_other_shapes(tiny_base):
    key = "unet." + lora_mod.target_names(tiny_base.unet, ("attn2.to_k",))[0]
    bad = {key: LoraWeights(down=torch.zeros(4, 768), up=torch.zeros(64, 4), alpha=4.0)}
    stack = LoraStack({"unet": tiny_base.unet, "text_encoder": tiny_base.text_encoder})
    try:
        stack.set([Applied("sd15file", bad, 1.0)])
    except ValueError as e:
        assert "768" in str(e) and "another base" in str(e)
    else:
        raise AssertionError("a 768-wide LoRA was applied to a 32-wide module")
