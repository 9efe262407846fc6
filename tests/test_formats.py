"""formats.py + safefiles.py: round trips with alpha != rank, key spellings, metadata, hashes, safe I/O.

Tiny tensors only; no model is built.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import pytest
import safetensors.torch
import torch

from sdlora import safefiles

from sdlora.bases import families
from sdlora.loras import detect
from sdlora.loras import diffusers_layout
from sdlora.loras import layouts as formats

from sdlora.loras import metadata
from sdlora.loras.layouts import LoraFileError, LoraWeights

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
OUT = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
V = "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v"
CONV = "unet.down_blocks.0.resnets.0.conv1"
TE_FLAT = "text_encoder.encoder.layers.0.self_attn.q_proj"           # transformers 5 CLIPTextModel spelling
TE = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"      # the spelling files carry


def make_loras(te_key: str = TE) -> formats.LoraSet:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        Q: LoraWeights(r(4, 8), r(6, 4), alpha=2.5),
        OUT: LoraWeights(r(4, 6), r(6, 4), alpha=2.5, dora_scale=r(6, 1).abs()),
        V: LoraWeights(r(2, 8), r(6, 2), alpha=7.0),                  # other rank, other alpha
        CONV: LoraWeights(r(4, 3, 3, 3), r(5, 4, 1, 1), alpha=1.0),
        te_key: LoraWeights(r(4, 12), r(12, 4), alpha=0.1),
    }


def names_of(loras: formats.LoraSet) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {"unet": set(), "text_encoder": set()}
    for k in loras:
        c, p = k.split(".", 1)
        out[c].add(p)
    return out


def assert_same(a: formats.LoraSet, b: formats.LoraSet, dtype=torch.float16) -> None:
    assert set(a) == set(b)
    for k in a:
        assert b[k].alpha == a[k].alpha, k
        assert torch.equal(b[k].down.to(dtype), a[k].down.to(dtype)), k
        assert torch.equal(b[k].up.to(dtype), a[k].up.to(dtype)), k
        assert (a[k].dora_scale is None) == (b[k].dora_scale is None), k
        if a[k].dora_scale is not None:
            assert torch.equal(b[k].dora_scale.to(dtype), a[k].dora_scale.to(dtype)), k


# ---- kohya -------------------------------------------------------------------------------------------------

def test_kohya_names_are_exactly_the_interop_examples():
    loras = {Q: LoraWeights(torch.ones(2, 8), torch.ones(6, 2), 1.0), OUT: LoraWeights(torch.ones(2, 6), torch.ones(6, 2), 1.0),
             V: LoraWeights(torch.ones(2, 8), torch.ones(6, 2), 1.0), TE_FLAT: LoraWeights(torch.ones(2, 12), torch.ones(12, 2), 1.0)}
    sd = formats.to_kohya(loras)
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight",
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
                "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha",
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"):
        assert key in sd
    assert all(k.count(".") == (2 if k.endswith(".weight") else 1) for k in sd)   # one dot before the tensor name
    assert formats.kohya_name(TE) == formats.kohya_name(TE_FLAT)


def test_kohya_round_trip_keeps_tensors_and_real_alphas(tmp_path):
    loras = make_loras()
    sd = formats.to_kohya(loras)
    assert sd["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha"].dim() == 0
    assert sd["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha"].item() == 7.0
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight"].dtype == torch.float16
    path = tmp_path / "style.safetensors"
    formats.save_lora_file(path, sd, {"ss_network_dim": "4"})
    sd2, meta = formats.read_lora_file(path)
    assert meta == {"ss_network_dim": "4"}
    back, unused = formats.from_kohya(sd2, names_of(loras))
    assert unused == []
    assert_same(loras, back)
    assert back[TE].alpha == 0.1                                      # fp32 alpha read back as the decimal written


def test_from_kohya_returns_the_bases_own_spelling_of_text_encoder_paths():
    back, unused = formats.from_kohya(formats.to_kohya(make_loras(TE_FLAT)), names_of(make_loras(TE_FLAT)))
    assert TE_FLAT in back and not unused


def test_from_kohya_reports_every_key_it_cannot_use():
    loras = make_loras()
    sd = formats.to_kohya(loras)
    extra = {
        "lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn2_to_q.lora_down.weight": torch.ones(2, 8),
        "lora_unet_down_blocks_9_attentions_0_transformer_blocks_0_attn2_to_q.lora_up.weight": torch.ones(6, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(2, 12),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(12, 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.lora_mid.weight": torch.ones(4, 4, 3, 3),   # LoCon Tucker
        "garbage": torch.ones(1),
    }
    back, unused = formats.from_kohya({**sd, **extra}, names_of(loras))
    assert set(unused) == set(extra) | {k for k in sd if k.startswith("lora_unet_down_blocks_0_resnets_0_conv1.")}
    assert CONV not in back and len(back) == len(loras) - 1


def test_missing_or_zero_alpha_means_alpha_equals_rank():
    sd = formats.to_kohya(make_loras())
    del sd["lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha"]
    sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q.alpha"] = torch.tensor(0.0)
    back, _ = formats.from_kohya(sd, names_of(make_loras()))
    assert back[V].alpha == 2.0 and back[Q].alpha == 4.0


def test_lora_weights_refuses_pairs_that_do_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        LoraWeights(torch.ones(4, 8), torch.ones(6, 3), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        LoraWeights(torch.ones(4, 8), torch.ones(6, 4), float("nan"))


# ---- diffusers ---------------------------------------------------------------------------------------------

def test_diffusers_round_trip_keeps_per_module_alphas(tmp_path):
    loras = make_loras(TE_FLAT)
    sd, meta = diffusers_layout.to_diffusers(loras)
    assert f"{Q}.lora_A.weight" in sd and f"{TE}.lora_B.weight" in sd and f"{OUT}.lora_magnitude_vector.weight" in sd
    assert sd[f"{OUT}.lora_magnitude_vector.weight"].shape == (6,)          # PEFT stores [out]
    cfg = json.loads(meta["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 2.5
    assert cfg["unet.alpha_pattern"] == {V[5:]: 7.0, CONV[5:]: 1.0} and cfg["unet.rank_pattern"] == {V[5:]: 2}
    assert cfg["text_encoder.lora_alpha"] == 0.1 and cfg["text_encoder.target_modules"] == [TE_FLAT[13:]]
    path = tmp_path / "d.safetensors"
    formats.save_lora_file(path, sd, meta)
    back, unused = diffusers_layout.from_diffusers(*formats.read_lora_file(path))
    assert unused == []
    assert_same({formats.canonical_key(k): w for k, w in loras.items()}, back)
    resolved, unused = diffusers_layout.from_diffusers(sd, meta, module_names=names_of(loras))
    assert TE_FLAT in resolved and not unused


def test_diffusers_without_metadata_means_alpha_rank_and_older_spellings_load():
    sd = {f"{Q}.lora.down.weight": torch.ones(4, 8), f"{Q}.lora.up.weight": torch.ones(6, 4),
          "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.down.weight": torch.ones(2, 6),
          "unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight": torch.ones(6, 2),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight": torch.ones(2, 12),
          "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight": torch.ones(12, 2),
          f"{V}.lora_A.weight": torch.ones(2, 8), f"{V}.lora_B.weight": torch.ones(6, 2), f"{V}.alpha": torch.tensor(3.0),
          "unet.something.else": torch.ones(1)}
    back, unused = diffusers_layout.from_diffusers(sd, {})
    assert back[Q].alpha == 4.0 and back[OUT].alpha == 2.0 and back[TE].alpha == 2.0 and back[V].alpha == 3.0
    assert unused == ["unet.something.else"]


def test_diffusers_rslora_metadata_becomes_alpha_over_rank():
    sd = {f"{Q}.lora_A.weight": torch.ones(4, 8), f"{Q}.lora_B.weight": torch.ones(6, 4)}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2.0, "unet.use_rslora": True})}
    back, _ = diffusers_layout.from_diffusers(sd, meta)
    assert back[Q].alpha / 4 == pytest.approx(2.0 / 4 ** 0.5)


# ---- detection ---------------------------------------------------------------------------------------------

def test_detect_format():
    loras = make_loras()
    assert detect.detect_format(formats.to_kohya(loras)) == "kohya"
    assert detect.detect_format(diffusers_layout.to_diffusers(loras)[0]) == "diffusers"
    assert detect.detect_format({"base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.ones(1, 1)}) == "peft"
    assert detect.detect_format({"model.diffusion_model.x.weight": torch.ones(1)}) == "unknown"


@pytest.mark.parametrize("dim,family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_detect_family_from_cross_attention_width(dim, family):
    kohya = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.ones(4, dim)}
    diffusers = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(4, dim)}
    assert detect.detect_family(kohya) == detect.detect_family(diffusers, {}) == family


def test_detect_family_from_sdxl_prefixes_and_metadata():
    assert detect.detect_family({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}) == "sdxl"
    empty: dict = {}
    assert detect.detect_family(empty, {"ss_base_model_version": "sdxl_base_v1-0"}) == "sdxl"
    assert detect.detect_family(empty, {"ss_v2": "True"}) == "sd2"
    assert detect.detect_family(empty, {"modelspec.architecture": "stable-diffusion-v1/lora"}) == "sd1"
    assert detect.detect_family(empty, {}) == "unknown"
    assert families.title("sd1") == "SD 1.x"


# ---- metadata ----------------------------------------------------------------------------------------------

def build(**over):
    args = dict(loras=make_loras(), trigger="neonstyle", steps=1200, num_images=12, resolution=512, seed=7,
                lr=1e-4, base_name="runwayml/stable-diffusion-v1-5", output_name="neon", text_encoder=True,
                tag_frequency={"neonstyle": 12, "a cat": 3}, training_started_at="2025-01-02T03:04:05+00:00",
                now=1735787045.0)
    args.update(over)
    return metadata.build_metadata(**args)


def test_metadata_has_every_required_key_and_only_strings():
    meta = build(extra={"sdlora_settings": {"rank": 4}})
    required = ["ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args", "ss_steps", "ss_num_train_images", "ss_resolution", "ss_seed", "ss_learning_rate",
                "ss_sd_model_name", "ss_output_name", "ss_training_started_at", "ss_tag_frequency",
                "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
                "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.trigger_phrase"]
    assert not [k for k in required if k not in meta]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["ss_network_module"]) == ("False", "sd_v1", "networks.lora")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.5")
    assert json.loads(meta["ss_network_args"]) == {"dora_wd": "True"}
    assert meta["ss_resolution"] == "(512, 512)" and meta["modelspec.resolution"] == "512x512"
    assert meta["ss_training_started_at"] == "1735787045.0"
    assert json.loads(meta["ss_tag_frequency"]) == {"images": {"neonstyle": 12, "a cat": 3}}
    assert meta["modelspec.sai_model_spec"] == "1.0.1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.trigger_phrase"] == "neonstyle"
    assert json.loads(meta["sdlora_settings"]) == {"rank": 4}


def test_metadata_for_sd2_and_bad_values():
    meta = build(family="sd2", prediction_type="v", resolution=(768, 640))
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", "sd_v2")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and meta["modelspec.resolution"] == "768x640"
    with pytest.raises(ValueError, match="family"):
        build(family="sd3")
    with pytest.raises(ValueError, match="ss_seed"):
        build(extra={"ss_seed": "1"})


def test_hashes_match_an_independent_computation(tmp_path):
    loras = make_loras()
    loras["unet.big"] = LoraWeights(torch.randn(4, 200_000), torch.randn(6, 4), 1.0)   # > 1.1 MB: legacy slice is data
    sd = formats.to_kohya(loras)
    meta = metadata.add_hashes(sd, {**build(), "modelspec.description": "edited later"})
    path = tmp_path / "h.safetensors"
    formats.save_lora_file(path, sd, meta)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()      # the file's tensor bytes
    ss_only = safetensors.torch.save(sd, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert len(ss_only) > 0x110000
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]


def test_sidecar_json_keys():
    side = metadata.sidecar_json("neonstyle", preferred_weight=0.8, family="sd1", description="d", notes="n")
    assert side == {"activation text": "neonstyle", "preferred weight": 0.8, "sd version": "SD1",
                    "description": "d", "notes": "n", "negative text": ""}
    assert metadata.sidecar_json("x", family="sdxl")["sd version"] == "SDXL"


# ---- atomic write ------------------------------------------------------------------------------------------

def test_atomic_write_failure_mid_way_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(fh, data):
        fh.write(data[: len(data) // 2])
        raise OSError("disk full")
    monkeypatch.setattr(safefiles, "_write_all", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        formats.save_lora_file(path, formats.to_kohya(make_loras()), {})
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["a.safetensors"]


def test_atomic_write_failure_before_rename_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safefiles.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        formats.atomic_write_bytes(tmp_path / "b.safetensors", b"x" * 3_000_000)
    assert os.listdir(tmp_path) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "c.bin"
    path.write_bytes(b"old content that is longer")
    formats.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["c.bin"]


# ---- validating read ---------------------------------------------------------------------------------------

def st_bytes(header: dict, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
BAD_HEADERS = {
    "too short": (b"\x01\x02", "too short"),
    "header over limit": (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "over the"),
    "header longer than file": (st_bytes(GOOD, bytes(8), length=10_000), "longer than the file"),
    "offsets beyond file": (st_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)), "'w'"),
    "non-tensor entry": (st_bytes({**GOOD, "junk": "hello"}, bytes(8)), "'junk'"),
    "unsupported dtype": (st_bytes({"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, bytes(8)), "I64"),
    "size mismatch": (st_bytes({"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "'w'"),
    "overlap": (st_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "overlap"),
    "not json": (struct.pack("<Q", 4) + b"{{{{" + bytes(8), "not valid JSON"),
    "metadata not str": (st_bytes({**GOOD, "__metadata__": {"ss_seed": 3}}, bytes(8)), "'ss_seed'"),
    "pickle renamed": (b"PK\x03\x04" + bytes(60), "pickle"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_headers_are_refused_naming_file_and_key(tmp_path, case):
    data, needle = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(LoraFileError) as err:
        formats.read_lora_file(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_hand_built_good_file_loads(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes({**GOOD, "__metadata__": {"a": "b"}}, struct.pack("<2f", 1.5, -2.0)))
    sd, meta = formats.read_lora_file(path)
    assert sd["w"].tolist() == [1.5, -2.0] and meta == {"a": "b"}


def test_nan_weights_are_refused_naming_the_key(tmp_path):
    path = tmp_path / "nan.safetensors"
    sd = {"lora_unet_x.lora_down.weight": torch.tensor([[1.0, float("nan")]])}
    path.write_bytes(safetensors.torch.save(sd))
    with pytest.raises(LoraFileError, match="lora_unet_x.lora_down.weight"):
        formats.read_lora_file(path)
    with pytest.raises(LoraFileError, match="NaN"):
        formats.save_lora_file(tmp_path / "out.safetensors", sd)


def test_missing_folder_and_wrong_type_are_explained(tmp_path):
    with pytest.raises(LoraFileError, match="no such file"):
        formats.read_lora_file(tmp_path / "nope.safetensors")
    with pytest.raises(LoraFileError, match="is a folder"):
        formats.read_lora_file(tmp_path)
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LoraFileError, match=r"x\.txt.*\.safetensors"):
        formats.read_lora_file(tmp_path / "x.txt")


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):                       # would create the marker file if unpickled
        return (open, (self.marker, "w"))


def test_pickles_refused_by_default_and_loaded_only_with_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 3)}, good)
    with pytest.raises(LoraFileError, match="arbitrary code.*safetensors"):
        formats.read_lora_file(good)
    sd, meta = formats.read_lora_file(good, allow_pickle=True)
    assert sd["lora_unet_x.lora_down.weight"].shape == (2, 3) and meta == {}

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as fh:
        pickle.dump({"w": Evil(str(marker))}, fh, protocol=2)       # torch.load's own protocol
    with pytest.raises(LoraFileError, match="weights_only.*Unsupported global"):
        formats.read_lora_file(evil, allow_pickle=True)
    assert not marker.exists()
