"""Interop at the full SD 1.5 architecture (random weights from the bundled configs, no download).

Our exported files map fully under A1111's, ComfyUI's and diffusers' key rules; diffusers'
own loader and our generator give the same effective weights at the same strength; and a
merged single-file checkpoint loads back equal to the fused pipeline.
"""
from __future__ import annotations

import pytest
import torch

from sdlora.loras import layouts as formats
from sdlora.training import adapters as lora_mod
from sdlora.config import LoraSpec
from sdlora.generate import Generator, LoraChoice, make_pipeline
from sdlora.generate import merge
from sdlora.loras.check import check_file
from sdlora.bases.load import random_base_from_configs, CONFIGS_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd15():
    base = random_base_from_configs(CONFIGS_DIR / "sd15", "sd15-random")
    for m in (base.unet, base.vae, base.text_encoder):
        m.requires_grad_(False).eval()
    return base


def export_random(base, spec: LoraSpec, path, seed=0):
    """Inject adapters as training does, give B random values, export through the kohya writer."""
    lora_mod.inject(base.unet, base.text_encoder, spec)
    g = torch.Generator().manual_seed(seed)
    try:
        models = [("unet", base.unet)] + ([("text_encoder", base.text_encoder)] if spec.text_encoder else [])
        loras = {}
        for comp, model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.data = torch.randn(p.shape, generator=g) * 0.05
            loras.update(lora_mod.extract(model, comp, spec))
    finally:
        lora_mod.remove_adapters(base.unet)
        lora_mod.remove_adapters(base.text_encoder)
    formats.save_lora_file(path, formats.to_kohya(loras, dtype=torch.float32), {"ss_base_model_version": "sd_v1"})
    return loras


@pytest.mark.parametrize("spec,expected", [
    (LoraSpec(rank=4, alpha=2.5, cross_attention="qkvo"), 64),
    (LoraSpec(rank=4, alpha=2.5, cross_attention="qkvo", self_attention=True), 128),
    (LoraSpec(rank=4, alpha=2.5, cross_attention="qkvo", text_encoder=True), 64 + 48),
    (LoraSpec(rank=4, alpha=2.5, cross_attention="kv"), 32),        # keys and values only
], ids=["cross-attention", "self-attention", "text-encoder", "keys-values"])
def test_exported_file_maps_fully_in_every_tool(sd15, tmp_path, spec, expected):
    path = tmp_path / "x.safetensors"
    export_random(sd15, spec, path)
    report = check_file(path, sd15)
    for tool in ("a1111", "comfyui", "diffusers"):
        r = report["tools"][tool]
        assert (r["mapped"], r["total"], r["unmapped"]) == (expected, expected, []), tool
    assert report["ok"] and report["family"] == "sd1"


def target_weights(base, loras):
    return {k: base.unet.get_submodule(k[5:]).weight.detach().clone() if k.startswith("unet.")
            else base.text_encoder.get_submodule(k[13:]).weight.detach().clone() for k in loras}


def test_same_effective_weights_as_diffusers(sd15, tmp_path):
    path = tmp_path / "te.safetensors"
    loras = export_random(sd15, LoraSpec(rank=4, alpha=2.5, text_encoder=True), path, seed=1)
    original = target_weights(sd15, loras)
    gen = Generator(sd15)
    ours = {}
    for w in (0.3, 0.8, 1.0):
        gen.set_loras([LoraChoice(str(path), w)], fused=True)
        ours[w] = target_weights(sd15, loras)
    gen.set_loras([])
    pipe = make_pipeline(sd15)
    pipe.load_lora_weights(str(path), adapter_name="x")         # loaded once; strengths change on top
    try:
        for w in (0.3, 0.8, 1.0):
            pipe.set_adapters(["x"], adapter_weights=[w])
            pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
            theirs = target_weights_peft(sd15, loras)
            pipe.unfuse_lora(components=["unet", "text_encoder"])
            for k in loras:
                assert torch.allclose(ours[w][k], theirs[k], atol=1e-5), (w, k)
                assert not torch.allclose(ours[w][k], original[k], atol=1e-6), (w, k)
    finally:
        pipe.unload_lora_weights()
        with torch.no_grad():                          # put the base back exactly
            for k, v in original.items():
                (sd15.unet.get_submodule(k[5:]) if k.startswith("unet.")
                 else sd15.text_encoder.get_submodule(k[13:])).weight.copy_(v)


def target_weights_peft(base, loras):
    """Fused weights while diffusers' PEFT layers wrap the modules (the weight sits in base_layer)."""
    def weight(model, path):
        m = model.get_submodule(path)
        return getattr(m, "base_layer", m).weight.detach().clone()
    return {k: weight(base.unet, k[5:]) if k.startswith("unet.") else weight(base.text_encoder, k[13:])
            for k in loras}


def test_merged_checkpoint_loads_back_equal_to_fused_pipeline(sd15, tmp_path):
    from sdlora.bases.single_file import load_single_file
    path = tmp_path / "lora.safetensors"
    export_random(sd15, LoraSpec(rank=4, alpha=2.5, text_encoder=True), path, seed=2)
    gen = Generator(sd15)
    gen.set_loras([LoraChoice(str(path), 0.8, 0.5)], fused=True)
    try:
        out = merge(gen, tmp_path / "merged.safetensors", dtype=torch.float16)
        from safetensors import safe_open
        with safe_open(str(out), "pt") as f:
            keys = list(f.keys())
        assert len(keys) == 1131
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."))
                   for k in keys)
        assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight" in keys
        parts = load_single_file(out, dtype=torch.float16)
        for name, model in (("unet", sd15.unet), ("vae", sd15.vae), ("text_encoder", sd15.text_encoder)):
            loaded = parts[name].state_dict()
            for k, v in model.state_dict().items():
                assert torch.equal(loaded[k], v.to(loaded[k].dtype)), (name, k)
    finally:
        gen.set_loras([])
