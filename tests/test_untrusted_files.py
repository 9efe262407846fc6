"""Files from elsewhere: refused before their tensors are read, with the key or file named.

What tests/test_formats.py already proves (each malformed header kind is refused, NaN weights,
pickles only with weights_only=True) is not repeated; this file adds that the refusal comes
before any tensor is loaded, Inf weights, pickles holding non-tensors, LoRAs for another base
through the generator, training checkpoints and base checkpoints.
"""
from __future__ import annotations

import json
import pickle
import struct
import tracemalloc

import pytest
import safetensors.torch
import torch

from sdlora.loras import layouts as formats

from sdlora.bases import single_file as ldm
from sdlora.loras.layouts import LoraFileError, LoraWeights
from sdlora.generate import Generator, LoraChoice
from sdlora.runs import load_checkpoint

TO_K = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"     # 32 -> 32 in the tiny base


def st_file(path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


GOOD = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE = {   # name: (header, data bytes, header length claimed, what the message must name)
    "header claims more bytes than the file": ({"w": GOOD}, bytes(8), 1 << 20, "longer than the file"),
    "entry that is not a tensor": ({"w": GOOD, "junk": {"dtype": "F32", "shape": [1]}}, bytes(8), None, "'junk'"),
    "integer dtype": ({"w": {**GOOD, "dtype": "I32"}}, bytes(8), None, "'w'"),
    "data beyond the end": ({"w": {**GOOD, "shape": [4], "data_offsets": [0, 16]}}, bytes(8), None, "'w'"),
}


@pytest.fixture
def no_tensor_reads(monkeypatch):
    def refuse(*args, **kw):
        raise AssertionError("tensors were loaded before the header was checked")
    monkeypatch.setattr(safetensors.torch, "load_file", refuse)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused_before_any_tensor_is_read(tmp_path, no_tensor_reads, case):
    header, data, length, needle = HOSTILE[case]
    path = st_file(tmp_path / "x.safetensors", header, data, length)
    with pytest.raises(LoraFileError) as err:
        formats.read_lora_file(path)
    assert str(path) in str(err.value) and needle in str(err.value), str(err.value)


def test_header_over_the_limit_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    with open(path, "wb") as fh:                    # 300 MiB, sparse: the claimed 200 MiB header is really there
        fh.write(struct.pack("<Q", 200 << 20) + b"{")
        fh.truncate(300 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(LoraFileError, match=r"header length 209715200 is over the .*limit"):
            formats.read_lora_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes were allocated to refuse it"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_inf_weights_are_refused_naming_the_key(tmp_path, dtype, bad):
    key = "lora_unet_x.lora_up.weight"
    sd = {"lora_unet_x.lora_down.weight": torch.ones(2, 4, dtype=dtype), key: torch.tensor([[1.0, bad]], dtype=dtype)}
    path = tmp_path / "inf.safetensors"
    path.write_bytes(safetensors.torch.save(sd))
    with pytest.raises(LoraFileError, match=rf"'{key}' has 1 NaN/Inf"):
        formats.read_lora_file(path)
    pt = tmp_path / "inf.pt"
    torch.save(sd, pt)
    with pytest.raises(LoraFileError, match=rf"'{key}' has 1 NaN/Inf"):
        formats.read_lora_file(pt, allow_pickle=True)


def test_pickle_holding_non_tensors_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.alpha": 4.0}, path)
    with pytest.raises(LoraFileError) as err:
        formats.read_lora_file(path, allow_pickle=True)
    assert "lora_unet_x.alpha" in str(err.value) and "float" in str(err.value), str(err.value)


# ---- a LoRA for another base --------------------------------------------------------------------------------

def lora_file(tmp_path, name: str, width: int, out: int = 320):
    """A kohya file adapting the tiny base's TO_K module, with the input width of another base."""
    loras = {TO_K: LoraWeights(torch.full((4, width), 0.01), torch.full((out, 4), 0.01), alpha=4.0)}
    path = tmp_path / f"{name}.safetensors"
    formats.save_lora_file(path, formats.to_kohya(loras), {})
    return path


def assert_base_untouched(gen: Generator, before: dict) -> None:
    assert gen.stack.applied == []
    assert all(torch.equal(gen.base.unet.state_dict()[k], v) for k, v in before.items())


def test_lora_with_shapes_of_another_base_names_the_module_and_says_so(tmp_path, tiny_base):
    gen = Generator(tiny_base)
    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    path = lora_file(tmp_path, "sd15style", 768)                     # an SD 1.5 LoRA: same family, other shapes
    with pytest.raises(ValueError) as err:
        gen.set_loras([LoraChoice(str(path))])
    text = str(err.value)
    assert TO_K in text and "768" in text and "another base" in text, text
    assert_base_untouched(gen, before)


@pytest.mark.parametrize("width,family", [(2048, "SDXL"), (1024, "SD 2.x")])
def test_lora_for_another_family_names_both_families(tmp_path, tiny_base, width, family):
    gen = Generator(tiny_base)
    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    path = lora_file(tmp_path, "other", width)
    with pytest.raises(ValueError) as err:
        gen.set_loras([LoraChoice(str(path))])
    text = str(err.value)
    assert str(path) in text and family in text and "SD 1.x" in text, text
    assert_base_untouched(gen, before)


def test_generator_refuses_a_hostile_file_before_reading_tensors(tmp_path, tiny_base, no_tensor_reads):
    gen = Generator(tiny_base)
    path = st_file(tmp_path / "lie.safetensors", {"w": GOOD}, bytes(8), length=1 << 20)
    with pytest.raises(LoraFileError, match="longer than the file"):
        gen.set_loras([LoraChoice(str(path))])
    assert gen.stack.applied == []


# ---- checkpoints: training checkpoints (resume) and base single files ---------------------------------------

class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):                        # would create the marker file if unpickled
        return (open, (self.marker, "w"))


def checkpoint(tmp_path, adapter: bytes | None = None, state=None):
    folder = tmp_path / "run" / "checkpoints" / "step-000001"
    folder.mkdir(parents=True)
    good = {"unet.x.lora_A.default.weight": torch.ones(2, 4), "unet.x.lora_B.default.weight": torch.zeros(4, 2)}
    (folder / "adapter.safetensors").write_bytes(adapter if adapter is not None else safetensors.torch.save(good))
    with open(folder / "state.pt", "wb") as fh:
        if state is None:
            torch.save({"optimizer": {}, "scheduler": {}, "step": 1}, fh)
        else:
            pickle.dump(state, fh, protocol=2)
    return folder


def test_training_checkpoint_with_nan_weights_is_refused_naming_the_key(tmp_path):
    key = "unet.x.lora_B.default.weight"
    sd = {"unet.x.lora_A.default.weight": torch.ones(2, 4), key: torch.full((4, 2), float("nan"))}
    folder = checkpoint(tmp_path, adapter=safetensors.torch.save(sd))
    with pytest.raises(LoraFileError, match=rf"adapter\.safetensors.*'{key}' has 8 NaN/Inf"):
        load_checkpoint(folder)


def test_training_checkpoint_with_a_hostile_header_is_refused_naming_the_file(tmp_path):
    raw = json.dumps({"w": GOOD}).encode()
    folder = checkpoint(tmp_path, adapter=struct.pack("<Q", 1 << 20) + raw + bytes(8))
    with pytest.raises(LoraFileError) as err:
        load_checkpoint(folder)
    assert str(folder / "adapter.safetensors") in str(err.value), str(err.value)


def test_training_checkpoint_state_runs_no_code_and_names_the_file(tmp_path):
    marker = tmp_path / "pwned"
    folder = checkpoint(tmp_path, state={"step": Evil(str(marker))})
    with pytest.raises(Exception) as err:
        load_checkpoint(folder)
    assert not marker.exists()
    assert isinstance(err.value, ValueError) and str(folder / "state.pt") in str(err.value), repr(err.value)
    assert "weights_only=False" not in str(err.value)          # never advise unpickling an untrusted file


def test_base_checkpoint_with_a_hostile_header_is_refused_naming_the_file(tmp_path):
    path = st_file(tmp_path / "base.safetensors", {"model.diffusion_model.w": GOOD}, bytes(8), length=1 << 20)
    with pytest.raises(ldm.CheckpointError) as err:
        ldm.load_single_file(path)
    assert str(path) in str(err.value), str(err.value)
