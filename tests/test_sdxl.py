"""SDXL: key names against the full-size architecture (on the meta device), diffusers' own loader, size
conditioning, the empty prompt, refusals of the wrong family, the refiner and inpainting, and defaults.

The end-to-end runs (train, check, inspect, generate, resume, merge, web UI) on SDXL single files and
diffusers folders are in test_bases_e2e.py with every other kind of base.
"""
from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdlora import Callbacks, DataConfig, LoraSpec, TrainConfig, train
from sdlora.bases.load import BaseModelError, load_base, native_geometry, tiny_random_base, tiny_random_xl_base
from sdlora.bases import ldm_keys
from sdlora.bases.ldm_unet import unet_to_ldm
from sdlora.config import GenerateConfig
from sdlora.generate import Generator, LoraChoice, make_pipeline, read_lora
from sdlora.loras import layouts
from sdlora.loras.check import check_file, format_check
from sdlora.loras.layouts import LoraFileError, LoraWeights
from sdlora.loras.naming import sdxl_naming
from sdlora.loras.tools import compat_report_sdxl
from sdlora.training.batches import Batches, Untriggered, size_ids
from sdlora.training.plan import suggested


def cfg(tmp_path, **kw):
    kw = {"base": "tiny-random-xl", "steps": 3, "lr": 1e-3, "sample_every": 0, "output_dir": str(tmp_path / "out"),
          **kw}
    return TrainConfig(**kw)


@pytest.fixture(scope="module")
def full_size():
    """SDXL 1.0's U-Net and both text encoders from the bundled configs, on the meta device (no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlora.bases.load import CONFIGS_DIR
    folder = CONFIGS_DIR / "sdxl"
    read = lambda sub: json.loads((folder / sub / "config.json").read_text())      # noqa: E731
    clip = lambda sub: CLIPTextConfig(**{k: v for k, v in read(sub).items() if not k.startswith("_")})  # noqa: E731
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(read("unet")),
                "text_encoder": CLIPTextModel(clip("text_encoder")),
                "text_encoder_2": CLIPTextModelWithProjection(clip("text_encoder_2"))}


def _linears(model, suffixes) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(suffixes)}


def test_full_size_sdxl_keys_are_kohyas_sgm_names_and_every_tool_maps_them(full_size):
    unet, te1, te2 = full_size["unet"], full_size["text_encoder"], full_size["text_encoder_2"]
    attn = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
    text = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
    loras = {}
    for component, model, suffixes in (("unet", unet, attn), ("text_encoder", te1, text),
                                       ("text_encoder_2", te2, text)):
        for path, m in _linears(model, suffixes).items():
            loras[f"{component}.{path}"] = LoraWeights(torch.zeros(1, m.in_features), torch.zeros(m.out_features, 1),
                                                       1.0)
    naming = sdxl_naming([n for n, _ in unet.named_modules()], unet.config)
    sd = layouts.to_kohya(loras, naming=naming)
    names = {k.split(".")[0] for k in sd}
    unet_names = {n for n in names if n.startswith("lora_unet_")}
    assert len(unet_names) == 280                                # 70 transformer blocks x q, k, v, out
    # SDXL's attention lives in input_blocks 4, 5 (2 blocks deep), 7, 8 (10 deep), the middle block (10) and
    # output_blocks 0-2 (10) and 3-5 (2) (kohya sdxl_original_unet.py; sgm sd_xl_base.yaml)
    blocks = {re.match(r"lora_unet_(.+?)_transformer_blocks", n)[1] for n in unet_names}
    assert blocks == {"input_blocks_4_1", "input_blocks_5_1", "input_blocks_7_1", "input_blocks_8_1", "middle_block_1",
                      *{f"output_blocks_{i}_1" for i in range(6)}}
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_out_0",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v"):
        assert name in names, name
    # each name is the module of that name in the original-layout checkpoint, with the right shapes
    sgm = {k.rsplit(".", 1)[0].replace(".", "_"): v.shape for k, v in unet_to_ldm(unet.state_dict()).items()
           if k.endswith(".weight")}
    for name in unet_names:
        shape = sgm[name[len("lora_unet_"):]]
        assert sd[f"{name}.lora_down.weight"].shape[1] == shape[1] and sd[f"{name}.lora_up.weight"].shape[0] == shape[0]
    assert sd["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[1] == 2048
    te_names = names - unet_names
    assert te_names == {f"lora_te{i}_text_model_encoder_layers_{n}_self_attn_{p}_proj" for i, layers in ((1, 12), (2, 32))
                        for n in range(layers) for p in ("q", "k", "v", "out")}
    assert sd["lora_te2_text_model_encoder_layers_31_self_attn_q_proj.lora_down.weight"].shape == (1, 1280)
    def names_of(model):        # as Base.module_names: every Linear and Conv2d
        return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    sets = {"unet_modules": names_of(unet), "text_encoder_modules": names_of(te1),
            "text_encoder_2_modules": names_of(te2), "unet_names": naming.unet_names}
    report = compat_report_sdxl(sd, **sets)
    assert {t: (r["mapped"], r["total"]) for t, r in report.items()} == {t: (456, 456) for t in report}   # 280 + 48 + 128
    # A1111 applies a bigG layer's q/k/v/out together to open_clip's fused in_proj: without out, q/k/v fail
    partial = {k: v for k, v in sd.items() if "lora_te2_text_model_encoder_layers_0_self_attn_out_proj" not in k}
    a1111 = compat_report_sdxl(partial, **sets)["a1111"]["unmapped"]
    assert a1111 == [f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("k", "q", "v")]


def test_full_size_text_encoders_round_trip_through_the_sgm_layout(full_size):
    te1, te2 = full_size["text_encoder"].state_dict(), full_size["text_encoder_2"].state_dict()
    sgm = ldm_keys.sdxl_text_encoders_to_ldm(te1, te2)
    assert sgm["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert sgm["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in sgm
    one, two = ldm_keys.sdxl_text_encoders_from_ldm(
        {k: v for k, v in sgm.items() if k.startswith("conditioner.embedders.0.")},
        {k: v for k, v in sgm.items() if k.startswith("conditioner.embedders.1.")})
    assert set(two) == set(te2) and {k: tuple(v.shape) for k, v in two.items()} == {k: tuple(v.shape)
                                                                                   for k, v in te2.items()}
    assert set(one) == {k for k in te1 if not k.endswith("position_ids")}


def test_text_projection_is_transposed_between_the_layouts():
    base = tiny_random_xl_base()
    w = torch.randn(32, 32)
    base.text_encoder_2.text_projection.weight.data.copy_(w)
    sgm = ldm_keys.sdxl_text_encoders_to_ldm(base.text_encoder.state_dict(), base.text_encoder_2.state_dict())
    assert torch.equal(sgm["conditioner.embedders.1.model.text_projection"], w.T)   # open_clip: pooled @ P


def test_diffusers_loads_our_sdxl_file_to_the_same_fused_weights(tmp_path, style_dir):
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, cross_attention="qkvo", self_attention=True),
                cfg(tmp_path, lr=2e-2))
    ours = Generator(load_base("tiny-random-xl", fresh=True))
    ours.set_loras([LoraChoice(str(res.lora_path), 0.8)], fused=True)
    theirs = make_pipeline(load_base("tiny-random-xl", fresh=True))
    theirs.load_lora_weights(str(res.lora_path))
    theirs.fuse_lora(lora_scale=0.8)
    plain = tiny_random_xl_base().unet
    compared = 0
    for name, m in plain.named_modules():
        if not name.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_out.0")):
            continue
        got = theirs.unet.get_submodule(name)
        got = getattr(got, "base_layer", got).weight
        want = ours.base.unet.get_submodule(name).weight
        assert not torch.equal(want, m.weight)                       # the LoRA changed this weight
        assert torch.allclose(got, want, atol=1e-5), name
        compared += 1
    assert compared == 17 * 3


def test_size_conditioning_is_each_images_own_size_and_crop():
    # a 96x64 (w x h) image in a 64x32 bucket: resized to 64x43 (cover), cropped 5 px from the top, centred
    ids = size_ids((96, 64), (64, 32), flip=True)
    assert ids.tolist() == [[64, 96, 5, 0, 32, 64], [64, 96, 5, 0, 32, 64]]
    ids = size_ids((64, 96), (32, 32), flip=True)               # cover: 32x48, the crop centred vertically
    assert ids[0].tolist() == [96, 64, 8, 0, 32, 32]
    ids = size_ids((120, 64), (64, 64), flip=True)              # cover: 120x64, 28 px cut off the left;
    assert ids[0].tolist()[3] == 28 and ids[1].tolist()[3] == 120 - 64 - 28   # the flipped side mirrors it


def test_batches_carry_size_ids_and_the_empty_prompt_is_zeros(tmp_path, style_dir):
    from sdlora.data.scan import scan_dataset
    base = load_base("tiny-random-xl")
    items, _ = scan_dataset(style_dir, "zqx", "{trigger}", 64)
    b = Batches(base, torch.device("cpu"), 2, False, False)
    cached = b.cache([it.path for it in items], [it.caption for it in items], [(64, 64)] * len(items),
                     [it.size for it in items])
    lat, cond, idx = b.draw(torch.Generator().manual_seed(0), cached)
    assert cond.hidden.shape == (2, 77, 64) and cond.pooled.shape == (2, 32) and cond.time_ids.shape == (2, 6)
    for row, i in zip(cond.time_ids.tolist(), idx.tolist()):
        w, h = items[i].size
        assert row[:2] == [h, w] and row[4:] == [64, 64]
    plain = Untriggered(b, [it.caption for it in items], "zqx")
    assert float(plain.embeds.hidden[-1].abs().max()) == 0 and float(plain.embeds.pooled[-1].abs().max()) == 0
    assert float(plain.embeds.hidden[0].abs().max()) > 0          # a caption is not
    prompt_ids = b.tokenize(["zqx, a red circle"])
    assert prompt_ids.shape == (1, 2, 77) and prompt_ids[0, 1, -1] == 0 and prompt_ids[0, 0, -1] == 49407
    # what the pipeline conditions on: both encoders' penultimate states side by side, the second's projection
    pipe = make_pipeline(base)
    embeds, _, pooled, _ = pipe.encode_prompt("zqx, a red circle", do_classifier_free_guidance=False)
    mine = b.encode_text(prompt_ids)
    assert torch.allclose(mine.hidden, embeds, atol=1e-5) and torch.allclose(mine.pooled, pooled, atol=1e-5)


def test_wrong_family_loras_are_refused_naming_both(tmp_path, style_dir):
    xl = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2, text_encoder=True),
               cfg(tmp_path, run_name="xl"))
    sd1 = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                cfg(tmp_path, base="tiny-random", run_name="sd1"))
    with pytest.raises(LoraFileError, match="LoRA for SDXL but the base 'tiny-random' is SD 1.x"):
        read_lora(xl.lora_path, tiny_random_base())
    report = check_file(xl.lora_path, tiny_random_base())
    assert not report["ok"] and "wrong base: the file is for SDXL, the base is SD 1.x" in format_check(report)
    # an SD 1.x file names its family only in its metadata when its widths are a small base's
    with pytest.raises(LoraFileError, match="LoRA for SD 1.x but the base 'tiny-random-xl' is SDXL"):
        read_lora(sd1.lora_path, tiny_random_xl_base())


def test_sdxl_refiner_and_inpainting_checkpoints_are_refused(tmp_path):
    unet = "model.diffusion_model."
    files = {
        "refiner": {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(8),
                    unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1280)},
        "inpaint": {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(8),
                    unet + "input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}}
    for kind, tensors in files.items():
        path = tmp_path / f"{kind}.safetensors"
        save_file(tensors, str(path))
        with pytest.raises(ValueError, match="refiner" if kind == "refiner" else "inpainting") as e:
            load_base(str(path), fresh=True)
        assert str(path) in str(e.value)


def test_sdxl_defaults_follow_the_family():
    s = suggested(10, "sdxl-random")
    assert (s["resolution"], s["lr"]) == (1024, 1e-4)
    assert native_geometry("sdxl-random").resolution == 1024 and native_geometry("tiny-random-xl").multiple == 32


def test_sdxl_run_says_its_memory_and_options_and_resumes_exactly(tmp_path, style_dir):
    lines = []

    class Rec(Callbacks):
        def __init__(self, stop=None):
            self.stop = stop

        def on_message(self, text):
            lines.append(text)

        def on_step(self, info):
            if self.stop is not None and info.step == 2:
                self.stop.set()
    data, spec = DataConfig(folder=str(style_dir), trigger="zqx", flip=True), LoraSpec(rank=4, text_encoder=True)
    full = train(data, spec, cfg(tmp_path, steps=4, run_name="full", caption_dropout=0.3), callbacks=Rec())
    estimate = next(line for line in lines if line.startswith("memory estimate"))
    assert "gradient checkpointing off" in estimate and "base precision fp32" in estimate and "VAE float32" in estimate
    stop = threading.Event()
    part = train(data, spec, cfg(tmp_path, steps=4, run_name="part", caption_dropout=0.3), callbacks=Rec(stop),
                 cancel=stop)
    assert part.cancelled
    resumed = train(None, resume=part.run_dir)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_generation_strength_zero_is_the_base_and_unet_and_te_strengths_apart(tmp_path, style_dir):
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, text_encoder=True),
                cfg(tmp_path, lr=2e-2))
    gen = Generator(load_base("tiny-random-xl", fresh=True))
    g = GenerateConfig(prompt="zqx, a red circle", seed=2, steps=3)
    plain = np.asarray(gen.generate(g))
    zero = np.asarray(gen.generate(g, [LoraChoice(str(res.lora_path), 0.0)]))
    unet_only = np.asarray(gen.generate(g, [LoraChoice(str(res.lora_path), 1.0, 0.0)]))
    te_only = np.asarray(gen.generate(g, [LoraChoice(str(res.lora_path), 0.0, 1.0)]))
    both = np.asarray(gen.generate(g, [LoraChoice(str(res.lora_path), 1.0)]))
    fused = np.asarray(gen.generate(g, [LoraChoice(str(res.lora_path), 1.0)], fused=True))
    assert np.array_equal(plain, zero)
    assert not np.array_equal(plain, unet_only) and not np.array_equal(plain, te_only)
    assert not np.array_equal(unet_only, both) and np.abs(both.astype(int) - fused).max() <= 1


def test_a_named_vae_trains_and_an_fp16_safe_one_stays_in_fp16(tmp_path, style_dir):
    from sdlora.bases.ldm_keys import vae_to_ldm
    from sdlora.bases.load import load_vae
    from sdlora.training.batches import Batches
    safe = tiny_random_xl_base(seed=9).vae
    safe.register_to_config(force_upcast=False)
    safe.save_pretrained(tmp_path / "vae-fp16-fix")
    like = tiny_random_xl_base().vae
    folder_vae = load_vae(str(tmp_path / "vae-fp16-fix"), like)
    assert folder_vae.config.force_upcast is False
    save_file({"first_stage_model." + k: v.contiguous() for k, v in vae_to_ldm(safe.state_dict()).items()},
              str(tmp_path / "vae.safetensors"))
    file_vae = load_vae(str(tmp_path / "vae.safetensors"), like)          # the original layout, the base's config
    assert all(torch.equal(a, b) for a, b in zip(file_vae.state_dict().values(), safe.state_dict().values()))
    with pytest.raises(BaseModelError, match="could not load the VAE"):
        load_vae(str(tmp_path / "nope"), like)
    # a VAE whose config says it overflows in fp16 encodes and decodes in fp32 and goes back to fp16; a safe one
    # stays
    base = load_base("tiny-random-xl", fresh=True)
    image = next(p for p in style_dir.iterdir() if p.suffix == ".png")
    for vae, upcast in ((like, True), (folder_vae, False)):
        base.vae = vae.half()
        seen = []
        hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
                 for m in (base.vae.encoder.conv_in, base.vae.decoder.conv_in)]
        batches = Batches(base, torch.device("cpu"), 1, False, False)
        batches.decode_latents(batches.encode(image, (64, 64)))            # calibration's round trip too
        for hook in hooks:
            hook.remove()
        assert seen == [torch.float32 if upcast else torch.float16] * 2 and base.vae.dtype == torch.float16
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                cfg(tmp_path, vae=str(tmp_path / "vae-fp16-fix")))
    assert json.loads((res.run_dir / "config.json").read_text())["train"]["vae"].endswith("vae-fp16-fix")
