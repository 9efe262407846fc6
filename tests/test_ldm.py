"""Original-SD single-file layout: key maps, counts, save/load, refusals.

The `sd15` fixture is the full SD 1.5 architecture (860M-param UNet) built
from the bundled configs with random weights, once per module. The rest use
tiny models. Independent oracles: diffusers' own LDM converters and
`from_single_file` read our files back to the same weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as dsf
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.bases import single_file as ldm
from sdlora.bases import variants
from sdlora.bases.single_file import CheckpointError

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
slow = pytest.mark.slow  # the full-size SD 1.5 tests: ~45 s together on 2 cores, ~5 GB RAM


def _fill(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct pseudo-random values in every parameter, much faster than real init:
    each tensor copies a slice of one random pool at its own random offset."""
    g = torch.Generator().manual_seed(seed)
    biggest = max(p.numel() for p in model.parameters())
    pool = torch.randn(biggest + 1_000_003, generator=g).to(next(model.parameters()).dtype)
    with torch.no_grad():
        for p in model.parameters():
            off = int(torch.randint(0, 1_000_000, (1,), generator=g))
            p.view(-1).copy_(pool[off:off + p.numel()])
    return model


def _meta_then_fill(make, seed, dtype):
    with torch.device("meta"):
        model = make().to(dtype)
    return _fill(model.to_empty(device="cpu"), seed).eval()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sd15():
    """Full SD 1.5 in fp16 (half the RAM and time of fp32; the fp32 paths are tested on tiny models)."""
    folder = ldm.config_dir("sd15")
    unet_cfg = UNet2DConditionModel.load_config(folder / "unet")
    vae_cfg = AutoencoderKL.load_config(folder / "vae")
    te_cfg = CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json")
    unet = _meta_then_fill(lambda: UNet2DConditionModel.from_config(unet_cfg), 1, torch.float16)
    vae = _meta_then_fill(lambda: AutoencoderKL.from_config(vae_cfg), 2, torch.float16)
    te = _fill(CLIPTextModel(te_cfg).half(), 3).eval()  # real build: position_ids is a non-persistent buffer
    return {"unet": unet, "vae": vae, "text_encoder": te, "unet_config": dict(unet_cfg)}


@pytest.fixture(scope="module")
def sd15_ldm(sd15):
    return ldm.pipeline_to_ldm(sd15["unet"].state_dict(), sd15["vae"].state_dict(),
                               sd15["text_encoder"].state_dict(), "sd15")


# ------------------------------------------------------------ full SD 1.5
@slow
def test_sd15_unet_round_trip_is_identity(sd15):
    sd = sd15["unet"].state_dict()
    back = ldm.unet_from_ldm(ldm.unet_to_ldm(sd), sd15["unet_config"])
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)  # renaming only, no copies


KNOWN_SD15_KEYS = {  # key -> shape, from the original SD 1.5 layout
    UNET + "time_embed.0.weight": (1280, 320), UNET + "time_embed.2.bias": (1280,),
    UNET + "input_blocks.0.0.weight": (320, 4, 3, 3),
    UNET + "input_blocks.1.0.in_layers.0.weight": (320,),
    UNET + "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
    UNET + "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
    UNET + "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_q.weight": (320, 320),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    UNET + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
    UNET + "input_blocks.3.0.op.weight": (320, 320, 3, 3), UNET + "input_blocks.9.0.op.weight": (1280, 1280, 3, 3),
    UNET + "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    UNET + "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    UNET + "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
    UNET + "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    UNET + "middle_block.2.out_layers.3.bias": (1280,),
    UNET + "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
    UNET + "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    UNET + "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight": (320, 320),
    UNET + "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    UNET + "out.0.weight": (320,), UNET + "out.2.weight": (4, 320, 3, 3),
    VAE + "encoder.conv_in.weight": (128, 3, 3, 3), VAE + "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    VAE + "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    VAE + "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), VAE + "encoder.mid.attn_1.norm.weight": (512,),
    VAE + "encoder.mid.block_2.conv2.weight": (512, 512, 3, 3), VAE + "encoder.norm_out.weight": (512,),
    VAE + "decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    VAE + "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    VAE + "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    VAE + "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    VAE + "quant_conv.weight": (8, 8, 1, 1), VAE + "post_quant_conv.weight": (4, 4, 1, 1),
    TEXT + "transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    TEXT + "transformer.text_model.embeddings.position_ids": (1, 77),
    TEXT + "transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
    TEXT + "transformer.text_model.encoder.layers.0.mlp.fc1.weight": (3072, 768),
    TEXT + "transformer.text_model.final_layer_norm.weight": (768,),
}


@slow
def test_sd15_single_file_key_names_and_counts(sd15_ldm):
    for key, shape in KNOWN_SD15_KEYS.items():
        assert key in sd15_ldm, key
        assert tuple(sd15_ldm[key].shape) == shape, key
    count = {p: sum(k.startswith(p) for k in sd15_ldm) for p in (UNET, VAE, TEXT)}
    assert count == {UNET: 686, VAE: 248, TEXT: 197} and len(sd15_ldm) == 1131
    assert not any(k.startswith((UNET + "label_emb", VAE + "decoder.up.0.upsample",
                                 VAE + "encoder.down.3.downsample")) for k in sd15_ldm)
    ids = sd15_ldm[TEXT + "transformer.text_model.embeddings.position_ids"]
    assert ids.dtype == torch.int64 and ids.tolist() == [list(range(77))]
    assert ldm.detect_checkpoint_family(sd15_ldm) == "sd1"


@slow
def test_sd15_matches_diffusers_converters(sd15, sd15_ldm):
    """diffusers' own LDM -> diffusers converters read our layout to the same tensors."""
    unet = dsf.convert_ldm_unet_checkpoint(sd15_ldm, sd15["unet_config"])
    assert _same(unet, sd15["unet"].state_dict())
    vae = dsf.convert_ldm_vae_checkpoint(sd15_ldm, dict(sd15["vae"].config))
    assert _same({k: v.reshape(sd15["vae"].state_dict()[k].shape) for k, v in vae.items()}, sd15["vae"].state_dict())
    text = dsf.convert_ldm_clip_checkpoint(sd15_ldm)
    text = {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("position_ids")}
    assert _same(text, sd15["text_encoder"].state_dict())


@slow
def test_sd15_save_load_fp16_exact(sd15, tmp_path):
    path = ldm.save_single_file(tmp_path / "sd15.safetensors", sd15["unet"], sd15["vae"], sd15["text_encoder"],
                                "sd15", metadata={"modelspec.title": "random"})
    assert [p.name for p in tmp_path.iterdir()] == ["sd15.safetensors"]  # no temp file left
    with safe_open(path, "pt") as f:
        assert len(f.keys()) == 1131 and f.metadata()["modelspec.title"] == "random"
    got = ldm.load_single_file(path, dtype=torch.float16)
    assert (got["family"], got["variant"], got["prediction_type"]) == ("sd1", "sd1", "epsilon")
    assert type(got["scheduler"]).__name__ == "PNDMScheduler"
    assert got["tokenizer"]("a cat").input_ids == [49406, 320, 2368, 49407]
    for name in ("unet", "vae", "text_encoder"):
        a, b = sd15[name].state_dict(), got[name].state_dict()
        assert a.keys() == b.keys()
        assert all(b[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a), name
    del got


@slow
def test_sd15_cross_attention_module_names(sd15):
    modules = [n for n, _ in sd15["unet"].named_modules()
               if n.endswith(("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))]
    assert len(modules) == 64
    names = ldm.ldm_module_names(modules)
    blocks = ([f"input_blocks_{i}_1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block_1"]
              + [f"output_blocks_{i}_1" for i in range(3, 12)])
    expected = {f"diffusion_model_{b}_transformer_blocks_0_attn2_{m}" for b in blocks
                for m in ("to_q", "to_k", "to_v", "to_out_0")}
    assert set(names.values()) == expected
    assert names["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"] == \
        "diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_q"
    assert names["up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"] == \
        "diffusion_model_output_blocks_3_1_transformer_blocks_0_attn2_to_out_0"
    # every module that holds weights maps onto a module of the original layout
    ldm_modules = {"diffusion_model_" + k.rsplit(".", 1)[0].replace(".", "_")
                   for k in ldm.unet_to_ldm(sd15["unet"].state_dict())}
    leaves = [n for n, m in sd15["unet"].named_modules() if getattr(m, "weight", None) is not None]
    assert set(ldm.ldm_module_names(leaves).values()) == ldm_modules


def test_sd21_full_layout_on_meta_tensors():
    """Full SD 2.1 key names, shapes and counts, at no cost: the models live on the meta device."""
    folder = ldm.config_dir("sd21")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_json_file(folder / "text_encoder" / "config.json"))
    parts = [m.state_dict() for m in (unet, vae, te)]
    sd = ldm.pipeline_to_ldm(*parts, "sd21")
    count = {p: sum(k.startswith(p) for k in sd) for p in (UNET, VAE, TEXT)}
    assert count == {UNET: 686, VAE: 248, TEXT: 23 * 12 + 4}  # open_clip block: 12 tensors; + 4 embeddings/ln_final
    shapes = {UNET + "input_blocks.1.1.proj_in.weight": (320, 320),  # linear in SD 2
              UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 1024),
              TEXT + "model.token_embedding.weight": (49408, 1024), TEXT + "model.positional_embedding": (77, 1024),
              TEXT + "model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
              TEXT + "model.transformer.resblocks.22.attn.in_proj_bias": (3072,),
              TEXT + "model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
              TEXT + "model.ln_final.weight": (1024,)}
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes
    assert ldm.detect_checkpoint_family(sd) == "sd2"
    unet_sd, vae_sd, te_sd = ldm.split_pipeline(sd)
    back = [ldm.unet_from_ldm(unet_sd, unet.config), ldm.vae_from_ldm(vae_sd),
            ldm.text_encoder_from_ldm(te_sd, te.config.to_dict())]
    for got, want in zip(back, parts):
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}


# ------------------------------------------------------------ tiny models
def _tiny_unet(width=768, **kw):
    cfg = dict(block_out_channels=(16, 32, 32), norm_num_groups=8, cross_attention_dim=width, attention_head_dim=4,
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
    cfg.update(kw)
    return _fill(UNet2DConditionModel(**cfg), 4).eval()


def _tiny_vae():
    return _fill(AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4,
                               down_block_types=("DownEncoderBlock2D",) * 2,
                               up_block_types=("UpDecoderBlock2D",) * 2), 5).eval()


def _tiny_text(width=768, layers=2):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=layers,
                             vocab_size=1000, max_position_embeddings=77,
                             bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return _fill(CLIPTextModel(cfg), 6).eval()


@pytest.mark.parametrize("kw", [
    {}, {"layers_per_block": 1}, {"use_linear_projection": True, "cross_attention_dim": 1024},
    {"num_class_embeds": 10}, {"class_embed_type": "timestep"},
    {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
     "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D")},
], ids=["sd", "layers1", "linear_proj", "class_embeds", "class_timestep", "odd_blocks"])
def test_unet_round_trip_tiny(kw):
    unet = _tiny_unet(**kw)
    sd = unet.state_dict()
    out = ldm.unet_to_ldm(sd)
    assert _same(ldm.unet_from_ldm(out, unet.config), sd)
    assert _same(ldm.unet_from_ldm({UNET + k: v for k, v in out.items()}, unet.config), sd)  # prefix accepted
    if "num_class_embeds" in kw:
        assert "label_emb.weight" in out
    if "class_embed_type" in kw:
        assert {"label_emb.0.0.weight", "label_emb.0.2.bias"} <= out.keys()
    if kw.get("layers_per_block") == 1:
        samplers = {"input_blocks.2.0.op.weight", "output_blocks.1.1.conv.weight", "output_blocks.3.2.conv.weight"}
        assert samplers <= out.keys()  # L=1: two layers per up block; up block 0 has no attention


def test_vae_attention_is_reshaped_and_round_trips():
    sd = _tiny_vae().state_dict()
    out = ldm.vae_to_ldm(sd)
    assert out["decoder.mid.attn_1.k.weight"].shape == (16, 16, 1, 1)
    assert out["decoder.mid.attn_1.norm.weight"].shape == (16,)
    assert "decoder.up.1.upsample.conv.weight" in out and "decoder.up.0.upsample.conv.weight" not in out
    assert _same(ldm.vae_from_ldm({VAE + k: v for k, v in out.items()}), sd)


def test_text_encoder_sd1_round_trip():
    te = _tiny_text()
    out = ldm.text_encoder_to_ldm(te.state_dict())
    assert len(out) == len(te.state_dict()) + 1  # + position_ids
    assert _same(ldm.text_encoder_from_ldm(out, te.config.to_dict()), te.state_dict())
    old_style = {k.replace("transformer.text_model.", "transformer."): v for k, v in out.items()}
    assert _same(ldm.text_encoder_from_ldm(old_style), te.state_dict())  # pre-`text_model` files


def test_text_encoder_sd2_fused_qkv():
    te = _tiny_text(width=1024, layers=3)
    sd = te.state_dict()
    out = ldm.text_encoder_to_ldm(sd)
    fused = out["model.transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (3072, 1024)
    assert torch.equal(fused, torch.cat([sd[f"encoder.layers.1.self_attn.{q}_proj.weight"] for q in "qkv"]))
    assert {"model.positional_embedding", "model.ln_final.bias", "model.transformer.resblocks.2.mlp.c_proj.weight",
            "model.transformer.resblocks.0.ln_2.weight"} <= out.keys()
    assert _same(ldm.text_encoder_from_ldm(out), sd)
    # diffusers' converter agrees
    theirs = dsf.convert_open_clip_checkpoint(te, {TEXT + k: v for k, v in out.items()})
    assert _same({k.removeprefix("text_model."): v for k, v in theirs.items()}, sd)
    # a config with fewer layers drops the last block and open_clip's unused head, as SD 2 needs
    extra = dict(out, **{"model.text_projection": torch.zeros(1024, 1024), "model.logit_scale": torch.ones(())})
    two = ldm.text_encoder_from_ldm(extra, {"num_hidden_layers": 2})
    assert not any(k.startswith("encoder.layers.2.") for k in two) and len(two) == len(sd) - 16


def _tiny_folder(tmp_path: Path, family: str) -> tuple[Path, dict]:
    width = 768 if family == "sd15" else 1024
    models = {"unet": _tiny_unet(width=width, use_linear_projection=width == 1024), "vae": _tiny_vae(),
              "text_encoder": _tiny_text(width=width)}
    folder = ldm.write_diffusers_config_folder(family, tmp_path / f"cfg-{family}")  # configs + tokenizer files
    models["unet"].save_config(folder / "unet")
    models["vae"].save_config(folder / "vae")
    models["text_encoder"].config.to_json_file(folder / "text_encoder" / "config.json")
    return folder, models


@pytest.mark.parametrize("family", ["sd15", "sd21", "sd21-base"])
def test_save_load_tiny_fp32_exact(tmp_path, family):
    folder, models = _tiny_folder(tmp_path, family)
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family=family, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # the header says which variant: nothing is assumed
        got = ldm.load_single_file(path, config=folder)
    for name, model in models.items():
        assert _same(got[name].state_dict(), model.state_dict()), name
    want = {"sd15": ("sd1", "sd1", "epsilon"), "sd21": ("sd2", "sd2-v", "v_prediction"),
            "sd21-base": ("sd2", "sd2-base", "epsilon")}[family]
    assert (got["family"], got["variant"], got["prediction_type"]) == want
    assert variants.single_file_variant(path).name == want[1]
    assert got["tokenizer"].pad_token == ("<|endoftext|>" if family == "sd15" else "!")


def test_save_fp16_from_fp32_is_the_rounded_copy(tmp_path):
    folder, models = _tiny_folder(tmp_path, "sd15")
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family="sd15")  # default dtype fp16
    got = ldm.load_single_file(path, config=folder, dtype=torch.float32)
    for name, model in models.items():
        ref = {k: v.half().float() for k, v in model.state_dict().items()}
        assert _same(got[name].state_dict(), ref), name
    with safe_open(path, "pt") as f:
        assert f.get_slice(TEXT + "transformer.text_model.embeddings.position_ids").get_dtype() == "I64"


def test_sd2_without_family_warns_and_assumes_v(tmp_path):
    folder, models = _tiny_folder(tmp_path, "sd21")
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family="sd2")   # no variant in the header
    with safe_open(path, "pt") as f:
        assert "modelspec.prediction_type" not in f.metadata()
    with pytest.warns(UserWarning, match="768px v_prediction"):
        got = ldm.load_single_file(path, config=folder)
    assert (got["variant"], got["prediction_type"]) == ("sd2-v", "v_prediction")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ldm.load_single_file(path, config=folder, prediction_type="epsilon")    # the caller's word wins
    assert (got["family"], got["variant"], got["prediction_type"]) == ("sd2", "sd2-base", "epsilon")


@pytest.mark.parametrize("yaml, variant", [('model:\n  params:\n    parameterization: "v"\n', "sd2-v"),
                                           ("model:\n  params:\n    linear_start: 0.00085\n", "sd2-base")])
def test_sd2_variant_from_an_a1111_yaml_beside_the_file(tmp_path, yaml, variant):
    _, models = _tiny_folder(tmp_path, "sd21")
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family="sd2")
    (tmp_path / "m.yaml").write_text(yaml)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert variants.single_file_variant(path).name == variant


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_diffusers_from_single_file_reads_our_file(tmp_path, family):
    folder, models = _tiny_folder(tmp_path, family)
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family=family, dtype=torch.float32)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    for name, model in models.items():
        assert _same(getattr(pipe, name).state_dict(), model.state_dict()), name
    assert pipe.tokenizer.pad_token == ("!" if family == "sd21" else "<|endoftext|>")


def test_detect_checkpoint_family():
    t = torch.zeros(1)
    assert ldm.detect_checkpoint_family({TEXT + "transformer.text_model.x": t}) == "sd1"
    assert ldm.detect_checkpoint_family({TEXT + "model.token_embedding.weight": t}) == "sd2"
    assert ldm.detect_checkpoint_family({"conditioner.embedders.0.transformer.x": t}) == "sdxl"
    for width, fam in ((768, "sd1"), (1024, "sd2"), (2048, "sdxl"), (5, "unknown")):
        key = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        assert ldm.detect_checkpoint_family({key: torch.zeros(320, width)}) == fam
    assert ldm.detect_checkpoint_family({"foo": t}) == "unknown"


def test_an_sdxl_file_without_its_second_text_encoder_is_named(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(2),
               UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(640, 2048),
               "first_stage_model.decoder.conv_out.weight": torch.zeros(3, 4, 3, 3)}, path)
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: no weights for the second text encoder "
                                              r"\(conditioner\.embedders\.1\.\*\)"):
        ldm.load_single_file(path)


def test_load_names_missing_extra_and_misshapen_keys(tmp_path):
    folder, models = _tiny_folder(tmp_path, "sd15")
    sd = ldm.pipeline_to_ldm(*(models[n].state_dict() for n in ("unet", "vae", "text_encoder")), "sd1")
    sd.pop(UNET + "middle_block.1.proj_out.weight")
    sd[UNET + "input_blocks.1.1.proj_in.bias"] = torch.zeros(3)
    sd[UNET + "output_blocks.7.1.extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        ldm.load_single_file(tmp_path / "bad.safetensors", config=folder)
    msg = str(e.value)
    assert "bad.safetensors" in msg and "mid_block.attentions.0.proj_out.weight" in msg
    assert "down_blocks.0.attentions.0.proj_in.bias (3,) vs (16,)" in msg
    assert "up_blocks.2.attentions.1.extra.weight" in msg


def test_unknown_keys_are_named():
    t = torch.zeros(1)
    with pytest.raises(CheckpointError, match="down_blocks.0.mystery.weight"):
        ldm.unet_to_ldm({"conv_in.weight": t, "down_blocks.0.mystery.weight": t})
    with pytest.raises(CheckpointError, match="middle_block.7.weight"):
        ldm.unet_from_ldm({"middle_block.7.weight": t})
    with pytest.raises(CheckpointError, match=r"encoder\.mid\.attn_1\.qq\.weight"):
        ldm.vae_from_ldm({"encoder.mid.attn_1.qq.weight": t})
    with pytest.raises(CheckpointError, match="model.visual.proj"):
        ldm.text_encoder_from_ldm({"model.visual.proj": t})
    with pytest.raises(CheckpointError, match="lora_unet_x"):
        ldm.split_pipeline({UNET + "a": t, VAE + "b": t, TEXT + "c": t, "lora_unet_x": t, "betas": t})
    with pytest.raises(CheckpointError, match="VAE"):
        ldm.split_pipeline({UNET + "a": t, TEXT + "c": t})
    with pytest.raises(CheckpointError, match="not_a_unet_path"):
        ldm.ldm_module_names(["not_a_unet_path"])


def test_pickle_refused_unless_allowed(tmp_path):
    folder, models = _tiny_folder(tmp_path, "sd15")
    sd = ldm.pipeline_to_ldm(*(models[n].state_dict() for n in ("unet", "vae", "text_encoder")), "sd1")
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match=r"m\.ckpt.*allow_pickle=True"):
        ldm.load_single_file(tmp_path / "m.ckpt", config=folder)
    got = ldm.load_single_file(tmp_path / "m.ckpt", config=folder, allow_pickle=True)
    assert _same(got["unet"].state_dict(), models["unet"].state_dict())


def test_family_mismatch_refused(tmp_path):
    _, models = _tiny_folder(tmp_path, "sd15")
    path = ldm.save_single_file(tmp_path / "m.safetensors", **models, family="sd15")
    with pytest.raises(CheckpointError, match="family='sd21'.*sd1"):
        ldm.load_single_file(path, family="sd21")
    with pytest.raises(ValueError, match="prediction_type='v'"):
        ldm.load_single_file(path, prediction_type="v")
    with pytest.raises(CheckpointError, match="width 1024"):
        ldm.save_single_file(tmp_path / "n.safetensors", **models, family="sd2")


def test_save_is_atomic(tmp_path, monkeypatch):
    _, models = _tiny_folder(tmp_path, "sd15")
    target = tmp_path / "out" / "m.safetensors"
    ldm.save_single_file(target, **models, family="sd15")
    before = target.read_bytes()

    def broken(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(ldm, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        ldm.save_single_file(target, **models, family="sd15")
    assert target.read_bytes() == before and [p.name for p in target.parent.iterdir()] == ["m.safetensors"]
    with pytest.raises(ValueError, match="strings"):
        ldm.save_single_file(target, **models, family="sd15", metadata={"steps": 3})
    with pytest.raises(ValueError, match=".safetensors"):
        ldm.save_single_file(tmp_path / "m.ckpt", **models, family="sd15")
