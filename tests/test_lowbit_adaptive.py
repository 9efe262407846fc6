"""A quantised base (int8 / nf4 through bitsandbytes) and AdaLoRA: training, resume, export, generation."""
from __future__ import annotations

import builtins
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdkit import StopAt
from sdlora import DataConfig, LoraSpec, TrainConfig, train
from sdlora.bases import precision
from sdlora.bases.load import load_base, tiny_random_base
from sdlora.config import ConfigError, GenerateConfig
from sdlora.generate import Generator, LoraChoice
from sdlora.loras.check import check_file
from sdlora.loras.inspect import describe

pytest.importorskip("bitsandbytes")


def cfg(tmp_path, **kw):
    kw = {"base": "tiny-random", "steps": 6, "lr": 1e-3, "sample_every": 0, "output_dir": str(tmp_path / "out"), **kw}
    return TrainConfig(**kw)


@pytest.mark.parametrize("kind, max_weight_error", [("int8", 0.01), ("nf4", 0.25)])
def test_quantize_swaps_every_linear_and_keeps_the_weights(kind, max_weight_error):
    ref = tiny_random_base().unet
    base = tiny_random_base()
    n = precision.quantize(base.unet, kind)
    linears = [name for name, m in ref.named_modules() if type(m) is torch.nn.Linear]
    assert n == len(linears) == 80
    assert precision.precision_of(base.unet) == kind and precision.precision_of(ref) == "fp32"
    for name in linears:
        q = base.unet.get_submodule(name)
        assert precision.is_quantized(q) and precision.weight_shape(q) == ref.get_submodule(name).weight.shape
        w0 = ref.get_submodule(name).weight
        err = (precision.dequantized_weight(q) - w0).abs().max() / w0.abs().max()
        assert err < max_weight_error, name
    x, t, enc = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        a, b = ref(x, t, enc).sample, base.unet(x, t, enc).sample
    assert 0 < float((a - b).norm() / a.norm()) < (0.01 if kind == "int8" else 0.1)


def test_missing_bitsandbytes_is_one_line_that_says_how_to_install(monkeypatch, tmp_path, style_dir):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kw):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kw)
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(precision.PrecisionError, match="pip install bitsandbytes"):
        load_base("tiny-random", precision="nf4", fresh=True)
    with pytest.raises(precision.PrecisionError, match="pip install bitsandbytes"):
        train(DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path, base_precision="int8"))
    assert not (tmp_path / "out").exists()          # refused before a run folder was made


def test_nf4_base_trains_exports_an_ordinary_lora_and_resumes_exactly(tmp_path, style_dir):
    data, spec = DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, cross_attention="qkvo")
    full = train(data, spec, cfg(tmp_path, base_precision="nf4", run_name="full", checkpoint_every=3))
    sd = load_file(str(full.lora_path))
    assert len([k for k in sd if k.endswith(".lora_down.weight")]) == 28      # 7 blocks x q, k, v, out
    assert all(k.startswith("lora_unet_") for k in sd)
    assert max(float(v.abs().max()) for k, v in sd.items() if "lora_up" in k) > 0       # it learnt
    assert check_file(full.lora_path, tiny_random_base())["ok"]
    msgs = []

    class Rec(StopAt):
        def on_message(self, text):
            msgs.append(text)
    stop = threading.Event()
    part = train(data, spec, cfg(tmp_path, base_precision="nf4", run_name="part"), callbacks=Rec(3, stop),
                 cancel=stop)
    assert part.cancelled and any("base weights nf4" in m for m in msgs)
    resumed = train(None, resume=part.run_dir)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_quantised_base_generates_with_a_lora_like_the_full_precision_one(tmp_path, style_dir):
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, cross_attention="qkvo"),
                cfg(tmp_path, lr=5e-3))
    g = GenerateConfig(prompt="zqx, a red circle", seed=3, steps=4)
    images = {}
    for kind in ("fp32", "int8", "nf4"):
        gen = Generator(load_base("tiny-random", precision=kind, fresh=True))
        base_img = np.asarray(gen.generate(g), dtype=np.float32)
        gen.set_loras([LoraChoice(str(res.lora_path), 1.0)], fused=True)     # fused is unfused when quantised
        images[kind] = (base_img, np.asarray(gen.generate(g), dtype=np.float32))
        gen.set_loras([LoraChoice(str(res.lora_path), 0.0)])
        assert np.array_equal(np.asarray(gen.generate(g), dtype=np.float32), base_img)   # strength 0 == base
    lora_move = np.abs(images["fp32"][1] - images["fp32"][0]).mean()
    assert lora_move > 1                                    # the LoRA changes the fp32 image
    for kind in ("int8", "nf4"):
        # the LoRA moves the quantised base's image the same way it moves the fp32 base's
        move = (images[kind][1] - images[kind][0]).ravel()
        ref = (images["fp32"][1] - images["fp32"][0]).ravel()
        assert np.corrcoef(move, ref)[0, 1] > 0.8, kind


def test_bf16_base_trains_with_fp32_adapters(tmp_path, style_dir):
    res = train(DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path, steps=3, base_precision="bf16"))
    sd = load_file(str(res.lora_path))
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k.endswith(".weight"))      # saved as fp16, like any run
    assert np.isfinite(res.final_loss)


def test_a_given_base_of_another_precision_is_refused(tmp_path, style_dir):
    with pytest.raises(ConfigError, match="base_precision='nf4' but the base given is fp32"):
        train(DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path, base_precision="nf4"),
              base=tiny_random_base())


def test_adalora_prunes_ranks_per_module_and_the_file_keeps_the_update(tmp_path, style_dir):
    spec = LoraSpec(rank=4, adapter="adalora", adalora_interval=1)
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), spec, cfg(tmp_path, steps=12, lr=5e-3))
    sd = load_file(str(res.lora_path))
    downs = {k[: -len(".lora_down.weight")]: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    ranks = {k: v.shape[0] for k, v in downs.items()}
    assert len(set(ranks.values())) > 1                      # modules have their own ranks
    assert max(ranks.values()) <= spec.init_rank == 6
    total = sum(ranks.values())
    assert total <= 4 * 28                                   # the budget: an average rank of 4 over 28 modules
    for name, r in ranks.items():
        assert sd[name + ".lora_up.weight"].shape[1] == r
    # one alpha (the target rank) for every module, each module's scale folded into its up weights: diffusers
    # applies one alpha to all modules of a kohya file, A1111 and ComfyUI each module's own
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {4.0}
    info = describe(res.lora_path)
    assert isinstance(info["rank"], str) and str(max(ranks.values())) in info["rank"]   # rank per module, counted
    assert check_file(res.lora_path, tiny_random_base())["ok"]


def test_adalora_file_applies_the_update_peft_trained(tmp_path, style_dir):
    """The exported file's alpha/rank * up @ down is PEFT's own AdaLoRA delta of each module."""
    from sdlora.training import adapters
    from sdlora.training.loop import _Trainer
    spec = LoraSpec(rank=4, adapter="adalora", adalora_interval=1)
    captured = {}
    real_export = _Trainer.export

    def export(self, run_dir):
        for path, layer in self.bare_unet.named_modules():
            if hasattr(layer, "lora_E") and adapters.ADAPTER in layer.lora_E:
                captured["unet." + path] = layer.get_delta_weight(adapters.ADAPTER).detach().float().clone()
        return real_export(self, run_dir)
    try:
        _Trainer.export = export
        res = train(DataConfig(folder=str(style_dir)), spec, cfg(tmp_path, steps=8, lr=5e-3))
    finally:
        _Trainer.export = real_export
    from sdlora.generate import read_lora
    from sdlora.loras.apply import delta_weight
    loaded = read_lora(res.lora_path, tiny_random_base()).loras
    assert loaded and set(loaded) <= set(captured)
    for key, w in loaded.items():
        delta = delta_weight(w, captured[key].shape)
        assert torch.allclose(delta, captured[key], atol=2e-3 * float(captured[key].abs().max()) + 1e-6), key
    for key in set(captured) - set(loaded):                  # modules left out were pruned to rank 0
        assert float(captured[key].abs().max()) == 0


def test_adalora_resume_equals_uninterrupted(tmp_path, style_dir):
    data = DataConfig(folder=str(style_dir))
    spec = LoraSpec(rank=3, adapter="adalora", adalora_interval=2)
    full = train(data, spec, cfg(tmp_path, steps=12, run_name="full"))
    stop = threading.Event()
    part = train(data, spec, cfg(tmp_path, steps=12, run_name="part"), callbacks=StopAt(7, stop), cancel=stop)
    assert part.cancelled and part.steps_done == 7
    resumed = train(None, resume=part.run_dir)
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_adalora_settings_are_checked():
    with pytest.raises(ConfigError, match="use_dora"):
        LoraSpec(rank=4, adapter="adalora", use_dora=True)
    with pytest.raises(ConfigError, match="adalora_init_rank=2"):
        LoraSpec(rank=4, adapter="adalora", adalora_init_rank=2)
    with pytest.raises(ConfigError, match="adalora_final"):
        LoraSpec(rank=4, adapter="adalora", adalora_warmup=0.5, adalora_final=0.5)
    assert LoraSpec(rank=8, adapter="adalora").init_rank == 12 and LoraSpec(rank=8).init_rank == 8
