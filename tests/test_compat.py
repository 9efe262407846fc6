"""compat.py: every key of our kohya export maps to a real module under A1111's, ComfyUI's and diffusers' rules.

Module names are generated for SD 1.5 (no model). The original-SD names are a literal table of where
SD 1.5 keeps its 16 transformer blocks, not the formula under test. The last test loads our files
with diffusers itself into a tiny UNet and CLIP and checks the scale it sets per module.
"""
from __future__ import annotations

import pytest
import torch

from sdlora.loras import tools as compat

from sdlora.loras import diffusers_layout

from sdlora.loras import layouts as formats
from sdlora.loras.layouts import LoraWeights

# SD 1.5: diffusers block -> original-SD block (input_blocks 1,2,4,5,7,8; middle_block 1; output_blocks 3..11).
BLOCKS = [("down_blocks.0.attentions.0", "input_blocks_1_1"), ("down_blocks.0.attentions.1", "input_blocks_2_1"),
          ("down_blocks.1.attentions.0", "input_blocks_4_1"), ("down_blocks.1.attentions.1", "input_blocks_5_1"),
          ("down_blocks.2.attentions.0", "input_blocks_7_1"), ("down_blocks.2.attentions.1", "input_blocks_8_1"),
          ("mid_block.attentions.0", "middle_block_1"),
          ("up_blocks.1.attentions.0", "output_blocks_3_1"), ("up_blocks.1.attentions.1", "output_blocks_4_1"),
          ("up_blocks.1.attentions.2", "output_blocks_5_1"), ("up_blocks.2.attentions.0", "output_blocks_6_1"),
          ("up_blocks.2.attentions.1", "output_blocks_7_1"), ("up_blocks.2.attentions.2", "output_blocks_8_1"),
          ("up_blocks.3.attentions.0", "output_blocks_9_1"), ("up_blocks.3.attentions.1", "output_blocks_10_1"),
          ("up_blocks.3.attentions.2", "output_blocks_11_1")]
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def unet_modules(attns=("attn1", "attn2")) -> set[str]:
    return {f"{b}.transformer_blocks.0.{a}.{p}" for b, _ in BLOCKS for a in attns for p in ATTN} | \
           {f"{b}.proj_in" for b, _ in BLOCKS} | {"time_embedding.linear_1", "down_blocks.1.resnets.0.conv1"}


def ldm_modules() -> set[str]:
    out = {f"diffusion_model_{o}_transformer_blocks_0_{a}_{p.replace('.', '_')}" for _, o in BLOCKS
           for a in ("attn1", "attn2") for p in ATTN}
    return out | {f"diffusion_model_{o}_proj_in" for _, o in BLOCKS} | \
        {"diffusion_model_time_embed_0", "diffusion_model_input_blocks_4_0_in_layers_2"}


def te_modules(flat: bool = True) -> set[str]:
    root = "" if flat else "text_model."           # transformers 5 CLIPTextModel is flat
    return {f"{root}encoder.layers.{n}.{p}" for n in range(12) for p in TE_LAYERS}


def export(keys, alpha=lambda i: 2.5) -> dict[str, torch.Tensor]:
    return formats.to_kohya({k: LoraWeights(torch.ones(1, 2), torch.ones(2, 1), alpha(i)) for i, k in enumerate(sorted(keys))})


def report(sd, ldm=True):
    return compat.compat_report(sd, unet_modules=unet_modules(), text_encoder_modules=te_modules(),
                                ldm_unet_modules=ldm_modules() if ldm else None)


def test_single_name_rules():
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    assert compat.a1111_target(q) == "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_q"
    assert compat.a1111_target("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0") == \
        "diffusion_model_middle_block_1_transformer_blocks_0_attn2_to_out_0"
    assert compat.a1111_target("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v") == \
        "diffusion_model_output_blocks_11_1_transformer_blocks_0_attn2_to_v"
    assert compat.a1111_target("lora_te_text_model_encoder_layers_0_self_attn_q_proj") == \
        "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert compat.a1111_target("lora_unet_down_blocks_1_resnets_0_conv1") == "diffusion_model_input_blocks_4_0_in_layers_2"
    assert compat.a1111_target("lora_unet_nothing") is None
    assert compat.comfy_target(q, unet_modules()) == "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    assert compat.comfy_target("lora_te_text_model_encoder_layers_11_mlp_fc2") == "text_encoder.text_model.encoder.layers.11.mlp.fc2"
    assert compat.comfy_target(q, set()) is None
    assert compat.diffusers_target("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0") == \
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert compat.diffusers_target("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_ff_net_0_proj") == \
        "unet.down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"
    assert compat.diffusers_accepts(q) and not compat.diffusers_accepts("unet.x")


def test_cross_attention_export_maps_64_of_64_everywhere():
    keys = {f"unet.{m}" for m in unet_modules(("attn2",)) if ".attn2." in m}
    r = report(export(keys))
    assert {t: (v["mapped"], v["total"]) for t, v in r.items()} == {t: (64, 64) for t in compat.TOOLS}
    assert compat.format_report(r).splitlines() == ["A1111: 64/64 mapped", "ComfyUI: 64/64 mapped", "diffusers: 64/64 mapped"]


def test_full_export_with_text_encoder_from_flat_names_maps_everywhere():
    keys = {f"unet.{m}" for m in unet_modules()} | {f"text_encoder.{m}" for m in te_modules(flat=True)}
    r = report(export(keys))
    assert len(keys) == 128 + 16 + 2 + 72
    assert all(v["mapped"] == v["total"] == len(keys) for v in r.values()), compat.format_report(r)


def test_wrong_names_are_reported_by_name():
    good = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"}
    sd = export(good | {"unet.down_blocks.3.attentions.0.transformer_blocks.0.attn2.to_q"})   # SD 1.5 has no such block
    sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(1, 2)   # SDXL
    sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(2, 1)
    r = report(sd)
    bad = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
           "lora_unet_down_blocks_3_attentions_0_transformer_blocks_0_attn2_to_q"]
    for tool in compat.TOOLS:
        assert (r[tool]["mapped"], r[tool]["total"], r[tool]["unmapped"]) == (1, 3, bad), tool
    assert "not mapped: lora_te2_" in compat.format_report(r)


def test_diffusers_refuses_whole_file_with_a_key_it_cannot_convert():
    sd = export({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"})
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_mid.weight"] = torch.ones(1, 1)
    r = report(sd)
    assert r["diffusers"]["mapped"] == 0 and "lora_mid" in r["diffusers"]["note"]
    assert r["comfyui"]["mapped"] == 1


def test_notes_for_missing_ldm_names_and_differing_alphas():
    keys = {f"unet.{m}" for m in unet_modules(("attn2",)) if ".attn2." in m}
    r = report(export(keys, alpha=lambda i: 2.5 if i % 2 else 4.0), ldm=False)
    assert r["a1111"]["mapped"] == 64 and "name rule only" in r["a1111"]["note"]
    assert r["diffusers"]["mapped"] == 64 and "alphas differ" in r["diffusers"]["note"]


# ---- diffusers itself reads our alphas -------------------------------------------------------------------

def tiny_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, cross_attention_dim=12,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                                norm_num_groups=4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=12, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, vocab_size=50))
    return {"unet": unet, "text_encoder": te}


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_gets_our_scale(tmp_path, fmt):
    pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Loader
    models = tiny_models()
    loras = {}
    for comp, model in models.items():
        for i, (path, mod) in enumerate(n for n in model.named_modules() if "attn2" in n[0] or "self_attn" in n[0]):
            if isinstance(mod, torch.nn.Linear):
                r = 4 if i % 2 else 2
                alpha = 2.5 if fmt == "kohya" or i % 3 else 7.0   # diffusers reads one alpha per kohya file
                loras[f"{comp}.{path}"] = LoraWeights(torch.randn(r, mod.in_features), torch.randn(mod.out_features, r), alpha)
    sd, meta = (formats.to_kohya(loras), {}) if fmt == "kohya" else diffusers_layout.to_diffusers(loras)
    path = tmp_path / "x.safetensors"
    formats.save_lora_file(path, sd, meta)
    state, alphas, md = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_unet(state, alphas, models["unet"], metadata=md, adapter_name="a")
    Loader.load_lora_into_text_encoder(state, alphas, models["text_encoder"], metadata=md, adapter_name="a")
    for key, w in loras.items():
        comp, p = key.split(".", 1)
        mod = models[comp].get_submodule(p)
        assert mod.scaling["a"] == pytest.approx(w.alpha / w.rank), key
        assert torch.equal(mod.lora_A["a"].weight.half(), w.down.half()), key
