"""LoRA files in the layouts other trainers write, on the tiny random base, checked by numbers.

- diffusers' DreamBooth LoRA script: ``unet.<path>.lora.down.weight``, ``.lora_linear_layer.``, the older
  ``attn2.processor.to_q_lora.down.weight``, and PEFT ``lora_A`` / ``lora_B`` without metadata;
- diffusers 0.42: alphas only in the header's ``lora_adapter_metadata`` (r, lora_alpha, rank_pattern,
  alpha_pattern per component);
- ComfyUI's "Extract and Save Lora" (comfy_extras/nodes_lora_extract.py): ``diffusion_model.<original-SD
  path>`` and ``text_encoders.clip_l.transformer.<CLIP path>`` keys, ``.diff`` / ``.diff_b`` full deltas.

For each: what ``describe`` reports, what ``read_lora`` loads, and that an image changes at strength 1
and not at 0.
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from sdlora.bases.ldm_unet import UnetLayout, unet_path_to_ldm
from sdlora.config import GenerateConfig
from sdlora.generate import Generator, LoraChoice, read_lora
from sdlora.loras import detect
from sdlora.loras import diffusers_layout
from sdlora.loras import layouts as formats
from sdlora.loras.inspect import describe
from sdlora.loras.layouts import LoraWeights

ATTN = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
TE_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
CFG = GenerateConfig(prompt="a red circle", seed=3, steps=2)


def make_loras(base, unet=ATTN, te=TE_ATTN, rank=(4, 2), alpha=None, seed=0) -> formats.LoraSet:
    """Random pairs for the base's Linear/Conv2d modules ending in the given suffixes (keys in the base's
    own spelling); rank per component (unet, te); alpha(key, rank) -> alpha, default alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    out: formats.LoraSet = {}
    for (comp, model, suffixes), r in zip((("unet", base.unet, unet), ("text_encoder", base.text_encoder, te)), rank):
        for name in sorted(base.module_names()[comp]):
            if not name.endswith(suffixes):
                continue
            m = model.get_submodule(name)
            if isinstance(m, torch.nn.Conv2d):
                down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g) * 0.2
                up = torch.randn(m.out_channels, r, 1, 1, generator=g) * 0.2
            else:
                down = torch.randn(r, m.in_features, generator=g) * 0.2
                up = torch.randn(m.out_features, r, generator=g) * 0.2
            key = f"{comp}.{name}"
            out[key] = LoraWeights(down, up, alpha(key, r) if alpha else float(r))
    return out


def save(path, sd, meta=None) -> str:
    formats.save_lora_file(path, {k: v.contiguous() for k, v in sd.items()}, meta or {})
    return str(path)


def assert_same_loras(got: formats.LoraSet, want: formats.LoraSet) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        assert torch.equal(got[k].down, w.down) and torch.equal(got[k].up, w.up), k
        assert got[k].alpha == pytest.approx(w.alpha) and got[k].rank == w.rank, k


def assert_strength_one_changes_pixels_and_zero_does_not(base, path) -> None:
    gen = Generator(base)
    plain = np.asarray(gen.generate(CFG, [])).astype(np.int16)
    zero = np.asarray(gen.generate(CFG, [LoraChoice(path, 0.0)])).astype(np.int16)
    one = np.asarray(gen.generate(CFG, [LoraChoice(path, 1.0)])).astype(np.int16)
    assert np.array_equal(zero, plain)
    assert np.abs(one - plain).max() > 0


def unet_out(base) -> torch.Tensor:
    with torch.no_grad():
        return base.unet(torch.ones(1, 4, 8, 8), torch.tensor([10]), torch.ones(1, 77, 32)).sample


def counts(values) -> dict[str, int]:
    return {str(k): n for k, n in Counter(values).items()}


# ---- diffusers' DreamBooth LoRA script and older diffusers spellings -----------------------------------

# Older diffusers attention processors named the projection, not the module (LoRAAttnProcessor).
_OLD = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
        "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def dreambooth_sd(loras: formats.LoraSet, spelling: str) -> dict[str, torch.Tensor]:
    """The file train_dreambooth_lora.py (and older diffusers) wrote, without any alpha."""
    sd = {}
    for key, w in loras.items():
        ck = formats.canonical_key(key)                    # files carry "text_model."
        te = ck.startswith("text_encoder.")
        if spelling == "processor":
            proj = next(p for p in _OLD if ck.endswith("." + p))
            name = f"{ck[: -len(proj) - 1]}{'' if te else '.processor'}.{_OLD[proj]}_lora"
            names = (f"{name}.down.weight", f"{name}.up.weight")
        elif spelling == "peft":
            names = (f"{ck}.lora_A.weight", f"{ck}.lora_B.weight")
        else:   # "lora": the script's U-Net .lora. + text encoder .lora_linear_layer.; or all .lora_linear_layer.
            part = "lora_linear_layer" if te or spelling == "lora_linear_layer" else "lora"
            names = (f"{ck}.{part}.down.weight", f"{ck}.{part}.up.weight")
        sd[names[0]], sd[names[1]] = w.down, w.up
    return sd


@pytest.mark.parametrize("spelling", ["lora", "lora_linear_layer", "processor", "peft"])
def test_dreambooth_layouts_are_counted_and_loaded(tiny_base, tmp_path, spelling):
    loras = make_loras(tiny_base)                          # 28 U-Net attn2 at rank 4, 8 CLIP attn at rank 2
    path = save(tmp_path / f"db_{spelling}.safetensors", dreambooth_sd(loras, spelling))
    info = describe(path)
    assert (info["format"], info["modules"], info["unet_modules"], info["text_encoder_modules"]) == \
        ("diffusers", 36, 28, 8)
    assert json.loads(info["rank"]) == {"2": 8, "4": 28}
    assert json.loads(info["alpha"]) == {"2.0": 8, "4.0": 28}        # no alpha anywhere: alpha = rank
    assert info["unused_keys"] == 0
    loaded = read_lora(path, tiny_base)
    assert_same_loras(loaded.loras, loras)
    assert loaded.unused == []
    assert_strength_one_changes_pixels_and_zero_does_not(tiny_base, path)


def test_diffusers_adapter_metadata_alphas_per_module(tiny_base, tmp_path):
    """diffusers 0.42: alphas only in lora_adapter_metadata; describe must not use one number for all."""
    loras = make_loras(tiny_base, alpha=lambda k, r: 1.0 if k.endswith("to_q") else 6.0 if r == 2 else 3.0)
    mid_k = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    m = tiny_base.unet.get_submodule(mid_k)                            # one module at another rank and alpha
    loras[f"unet.{mid_k}"] = LoraWeights(torch.randn(8, m.in_features) * 0.2, torch.randn(m.out_features, 8) * 0.2, 5.0)
    sd, meta = diffusers_layout.to_diffusers(loras, dtype=torch.float32)
    meta["ss_network_alpha"] = "9.0"                                   # a stale kohya field must not win
    path = save(tmp_path / "d042.safetensors", sd, meta)
    info = describe(path)
    assert (info["modules"], info["unet_modules"], info["text_encoder_modules"]) == (36, 28, 8)
    assert json.loads(info["alpha"]) == counts(w.alpha for w in loras.values())
    assert json.loads(info["alpha"]) == {"1.0": 7, "3.0": 20, "5.0": 1, "6.0": 8}
    assert json.loads(info["rank"]) == {"2": 8, "4": 27, "8": 1}
    assert_same_loras(read_lora(path, tiny_base).loras, loras)
    assert_strength_one_changes_pixels_and_zero_does_not(tiny_base, path)


def test_diffusers_hand_written_patterns_match_module_suffixes(tiny_base, tmp_path):
    """rank_pattern / alpha_pattern name modules by a suffix, as PEFT matches them."""
    loras = make_loras(tiny_base, te=(), alpha=lambda k, r: 5.0 if k.endswith("attn2.to_k") else 2.0)
    sd = {}
    for k, w in loras.items():
        sd[f"{k}.lora_A.weight"], sd[f"{k}.lora_B.weight"] = w.down, w.up
    flat = {"unet.r": 4, "unet.lora_alpha": 2.0, "unet.alpha_pattern": {"attn2.to_k": 5.0}, "unet.rank_pattern": {}}
    path = save(tmp_path / "pat.safetensors", sd, {"lora_adapter_metadata": json.dumps(flat)})
    info = describe(path)
    assert info["modules"] == 28 and json.loads(info["alpha"]) == {"2.0": 21, "5.0": 7}
    assert {k: w.alpha for k, w in read_lora(path, tiny_base).loras.items()} == {k: w.alpha for k, w in loras.items()}


# ---- ComfyUI's own layout ------------------------------------------------------------------------------

def comfy_name(base, key: str) -> str:
    """A LoraSet key -> ComfyUI's module name (comfy_extras/nodes_lora_extract.py calc_lora_model)."""
    comp, path = key.split(".", 1)
    if comp == "unet":
        return "diffusion_model." + unet_path_to_ldm(path, UnetLayout.from_config(dict(base.unet.config)))
    return "text_encoders.clip_l.transformer." + formats.canonical_key(key).split(".", 1)[1]


def comfy_sd(base, loras: formats.LoraSet) -> dict[str, torch.Tensor]:
    sd = {}
    for key, w in loras.items():
        name = comfy_name(base, key)
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = w.up, w.down
        if w.alpha != w.rank:                                          # the node writes none: alpha = rank
            sd[f"{name}.alpha"] = torch.tensor(w.alpha)
    return sd


# What ComfyUI's default extract (bias_diff on) adds beside the pairs, and parts sdlora does not read.
EXTRAS = {"diffusion_model.input_blocks.1.1.proj_in.diff_b": (32,),
          "diffusion_model.input_blocks.1.1.norm.diff": (32,),
          "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff_b": (32,),
          "text_encoders.clip_l.transformer.text_projection.lora_down.weight": (4, 32),
          "text_encoders.clip_l.transformer.text_projection.lora_up.weight": (32, 4),
          "diffusion_model.out.2.lokr_w1": (2, 2)}
COMMUNITY = ATTN + ("attn1.to_q", "ff.net.0.proj", "ff.net.2", "proj_in", "resnets.0.conv1", "downsamplers.0.conv")


def test_comfyui_file_applies_the_same_weights_as_the_kohya_file(tiny_base, tmp_path):
    loras = make_loras(tiny_base, unet=COMMUNITY, te=TE_ATTN + ("mlp.fc1",),
                       alpha=lambda k, r: float(r) if "attn1" in k or "fc1" in k else 1.5)
    sd = comfy_sd(tiny_base, loras)
    # the names ComfyUI's original-SD U-Net gives the tiny base (layers_per_block=1), spelled out
    for name in ("diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_q.lora_down.weight",
                 "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.lora_up.weight",
                 "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_v.alpha",
                 "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight",
                 "diffusion_model.input_blocks.2.0.op.lora_up.weight",
                 "text_encoders.clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.lora_down.weight"):
        assert name in sd, name
    sd.update({k: torch.randn(*shape) * 0.1 for k, shape in EXTRAS.items()})
    c_path = save(tmp_path / "comfy.safetensors", sd)
    k_path = save(tmp_path / "kohya.safetensors", formats.to_kohya(loras, dtype=torch.float32))
    assert detect.detect_format(sd) == "comfyui"
    with pytest.warns(UserWarning, match=r"3 full bias/norm deltas.*bias_diff off"):
        comfy = read_lora(c_path, tiny_base)
    kohya = read_lora(k_path, tiny_base)
    assert_same_loras(comfy.loras, kohya.loras)
    assert_same_loras(comfy.loras, loras)
    assert comfy.unused == sorted(EXTRAS) and kohya.unused == []       # every extra key listed, none dropped
    c_info, k_info = describe(c_path), describe(k_path)
    n_unet, n_te = sum(k.startswith("unet.") for k in loras), sum(k.startswith("text_encoder.") for k in loras)
    assert (c_info["format"], c_info["modules"], c_info["unet_modules"], c_info["text_encoder_modules"]) == \
        ("comfyui", len(loras), n_unet, n_te)
    assert (n_unet, n_te) == (7 * 8 + 5 + 1, 2 * 5)       # 7 blocks x (attn2 x4, attn1, ff x2, proj_in), convs
    assert c_info["unused_keys"] == len(EXTRAS)
    for field in ("modules", "unet_modules", "text_encoder_modules", "rank", "alpha"):
        assert c_info[field] == k_info[field], field
    assert json.loads(c_info["alpha"]) == counts(w.alpha for w in loras.values())
    assert_strength_one_changes_pixels_and_zero_does_not(tiny_base, c_path)


def test_comfyui_full_weight_deltas_apply_exactly(tiny_base, tmp_path):
    """.diff (lora_type "full_diff"): W' = W + strength * diff, for wide, narrow, square and 3x3 conv weights."""
    g = torch.Generator().manual_seed(5)
    keys = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",    # 32 -> 256
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",         # 128 -> 32
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",           # 32 -> 32
            "unet.down_blocks.1.resnets.0.conv1",                                    # 3x3 conv
            "text_encoder.encoder.layers.0.self_attn.v_proj"]
    gen = Generator(tiny_base)
    diffs = {k: torch.randn(gen.stack.module(k).weight.shape, generator=g) * 0.05 for k in keys}
    path = save(tmp_path / "full.safetensors", {f"{comfy_name(tiny_base, k)}.diff": d for k, d in diffs.items()})
    info = describe(path)
    assert (info["format"], info["modules"], info["unet_modules"], info["unused_keys"]) == ("comfyui", 5, 4, 0)
    w0 = {k: gen.stack.module(k).weight.detach().clone() for k in keys}
    out0 = unet_out(tiny_base)
    gen.set_loras([LoraChoice(path, 0.7)])                                          # hooks
    hooked = unet_out(tiny_base)
    gen.set_loras([LoraChoice(path, 0.7)], fused=True)
    for k in keys:
        assert torch.allclose(gen.stack.module(k).weight, w0[k] + 0.7 * diffs[k], atol=1e-6), k
    fused = unet_out(tiny_base)
    assert torch.allclose(hooked, fused, atol=1e-4) and (fused - out0).abs().max() > 1e-3
    gen.set_loras([])
    assert_strength_one_changes_pixels_and_zero_does_not(tiny_base, path)


@pytest.mark.parametrize("key,width,family", [
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.lora_down.weight", 768, "sd1"),
    ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.lora_down.weight", 1024, "sd2"),
    ("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.lora_down.weight", 2048, "sdxl"),
    ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight", 768, "sd1"),
    ("text_encoders.clip_h.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight", 1024, "sd2"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight", 1280, "sdxl"),
    ("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.diff", 768, "sd1"),
])
def test_comfyui_family_from_down_widths(key, width, family):
    sd = {key: torch.zeros(4, width)}
    assert detect.detect_format(sd) == "comfyui"
    assert detect.detect_family(sd) == family


def test_comfyui_file_for_another_base_or_no_module_is_refused_by_name(tiny_base, tmp_path):
    xl = save(tmp_path / "xl.safetensors",
              {"text_encoders.clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight":
               torch.zeros(4, 1280)})
    with pytest.raises(formats.LoraFileError, match=r"xl\.safetensors.*SDXL"):
        read_lora(xl, tiny_base)
    none = save(tmp_path / "none.safetensors", {"diffusion_model.input_blocks.9.1.x.lora_down.weight": torch.ones(4, 8),
                                                "diffusion_model.input_blocks.9.1.x.lora_up.weight": torch.ones(8, 4)})
    with pytest.raises(formats.LoraFileError, match=r"none\.safetensors: none of its 2 keys"):
        read_lora(none, tiny_base)


def test_check_reads_a_comfyui_file_as_the_kohya_file_it_would_be(tiny_base, tmp_path):
    """`sdlora check` on a ComfyUI-layout file: its LoRA pairs, checked as the kohya names the tools map."""
    from sdlora.loras.check import check_file
    loras = make_loras(tiny_base, unet=("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"), te=TE_ATTN,
                       alpha=lambda k, r: 1.5)
    c_path = save(tmp_path / "comfy.safetensors", comfy_sd(tiny_base, loras))
    report = check_file(c_path, tiny_base)
    assert report["format"] == "comfyui"
    for tool in ("comfyui", "diffusers"):
        assert (report["tools"][tool]["mapped"], report["tools"][tool]["total"]) == (len(loras), len(loras)), tool


def test_a_file_diffusers_itself_saves_is_counted_and_applied_as_diffusers_applies_it(tiny_base, tmp_path):
    """The path diffusers' DreamBooth LoRA script takes: PEFT adapters on the U-Net with per-module ranks and
    alphas (rank_pattern / alpha_pattern), saved by diffusers' own save_lora_weights. inspect counts every
    module with its own rank and alpha, and sdlora at strength 1 draws what diffusers draws after its own
    load_lora_weights. (U-Net only: the text-encoder half of diffusers' loader goes through transformers'
    PEFT integration, which the installed transformers refuses with the installed peft.)"""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from sdlora.bases.load import tiny_random_base
    from sdlora.generate import make_pipeline, render
    odd_rank = "mid_block.attentions.0.transformer_blocks.0.attn2.to_q"
    odd_alpha = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    cfg = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(ATTN),
                     rank_pattern={odd_rank: 2}, alpha_pattern={odd_alpha: 1.5})
    torch.manual_seed(0)
    unet = tiny_random_base().unet
    unet.add_adapter(cfg)
    with torch.no_grad():                         # B starts at zero: give every pair an update that shows
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=cfg.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    info = describe(path)
    n = sum(1 for name, _ in tiny_base.unet.named_modules() if name.endswith(ATTN))
    assert (info["format"], info["modules"], info["unet_modules"]) == ("diffusers", n, n)
    assert json.loads(info["alpha"]) == {"1.5": 1, "4.0": n - 1}
    assert json.loads(info["rank"]) == {"2": 1, "4": n - 1}
    loaded = read_lora(path, tiny_base)
    assert loaded.unused == [] and loaded.loras["unet." + odd_alpha].alpha == 1.5
    assert loaded.loras["unet." + odd_rank].rank == 2

    gen_cfg = GenerateConfig(prompt="a red circle", seed=3, steps=3)
    theirs = make_pipeline(tiny_random_base())
    theirs.load_lora_weights(str(path), adapter_name="x")
    gen = Generator(tiny_base)
    ours = np.asarray(gen.generate(gen_cfg, [LoraChoice(str(path), 1.0)]), dtype=np.int16)
    bare = np.asarray(gen.generate(gen_cfg, []), dtype=np.int16)
    want = np.asarray(render(theirs, gen_cfg, tiny_base.resolution), dtype=np.int16)
    assert np.abs(ours - want).max() <= 2 and np.abs(bare - want).max() > 10
