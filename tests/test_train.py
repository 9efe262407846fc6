"""Training on the tiny random base: files, resume, non-finite loss, only LoRA changes."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdkit import StopAt
from sdlora import Callbacks, DataConfig, LoraSpec, TrainConfig, TrainingError, train

from sdlora.bases.load import tiny_random_base
from sdlora.training.loop import _Trainer


class Messages(Callbacks):
    """Training callbacks that keep every message the run prints."""

    def __init__(self):
        self.lines = []

    def on_message(self, text):
        self.lines.append(text)


def cfg(tmp_path, **kw):
    kw = {"base": "tiny-random", "steps": 6, "lr": 1e-3, "sample_every": 0, "output_dir": str(tmp_path / "out"), **kw}
    return TrainConfig(**kw)


def test_train_writes_run_folder_with_lora_config_and_sidecars(tmp_path, style_dir):
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, alpha=2.0, cross_attention="qkvo"),
                cfg(tmp_path))
    run = res.run_dir
    assert run.name == "zqx" and res.steps_done == 6 and not res.cancelled
    assert res.lora_path == run / "zqx.safetensors"
    sd = load_file(str(res.lora_path))
    assert len([k for k in sd if k.endswith(".lora_down.weight")]) == 28
    assert all(k.startswith("lora_unet_") for k in sd)
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {2.0}
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k.endswith("weight"))
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 6 and config["lora"]["rank"] == 4 and "torch" in config["versions"]
    assert config["captions"]["img 0.png"] == "zqx, a square outline"       # trigger added to the .txt caption
    sidecar = json.loads((run / "zqx.json").read_text())
    assert sidecar["activation text"] == "zqx" and sidecar["sd version"] == "SD1"
    assert (run / "zqx.preview.png").is_file()
    assert len((run / "log.csv").read_text().splitlines()) == 6
    from safetensors import safe_open
    with safe_open(str(res.lora_path), "pt") as f:
        header = json.dumps(f.metadata())
    settings = json.loads(json.loads(header)["sdlora_settings"])
    assert str(tmp_path) not in header                                 # no folder of this machine in a shared file
    assert settings["data"]["folder"] == style_dir.name and settings["train"]["output_dir"] == "out"


def test_trained_lora_changes_only_lora_parameters(tmp_path, style_dir, tiny_base):
    before = {k: v.clone() for k, v in tiny_base.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in tiny_base.text_encoder.state_dict().items()}
    res = train(DataConfig(folder=str(style_dir)), LoraSpec(rank=4), cfg(tmp_path, steps=3), base=tiny_base)
    # the caller's base comes back without adapters and with identical weights
    assert tiny_base.unet.state_dict().keys() == before.keys()
    assert all(torch.equal(tiny_base.unet.state_dict()[k], v) for k, v in before.items())
    assert all(torch.equal(tiny_base.text_encoder.state_dict()[k], v) for k, v in te_before.items())
    sd = load_file(str(res.lora_path))
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert all(u.abs().sum() > 0 for u in ups)                     # every B moved away from zero


def test_second_run_never_overwrites_the_first(tmp_path, style_dir):
    a = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path, steps=2))
    first = a.lora_path.read_bytes()
    b = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path, steps=2, seed=5))
    assert b.run_dir.name == "zqx-2" and a.lora_path.read_bytes() == first


def test_resume_equals_uninterrupted(tmp_path, style_dir):
    data = DataConfig(folder=str(style_dir), flip=True)
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.1, text_encoder=True)
    full = train(data, spec, cfg(tmp_path, steps=6, schedule="cosine", warmup_steps=2, run_name="full"))
    stop = threading.Event()
    part = train(data, spec, cfg(tmp_path, steps=6, schedule="cosine", warmup_steps=2, run_name="part"),
                 callbacks=StopAt(3, stop), cancel=stop)
    assert part.cancelled and part.steps_done == 3 and part.lora_path is None
    resumed = train(None, resume=part.run_dir)
    assert resumed.steps_done == 6 and resumed.run_dir == part.run_dir
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and any(k.startswith("lora_te_") for k in a)
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k


def test_non_finite_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, style_dir, monkeypatch):
    real = _Trainer.one_step

    def nan_at_5(self, step):
        return float("nan") if step == 4 else real(self, step)
    monkeypatch.setattr(_Trainer, "one_step", nan_at_5)
    with pytest.raises(TrainingError, match=r"at step 5.*step-000004"):
        train(DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path, steps=8, checkpoint_every=2))
    run = tmp_path / "out" / "sks"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not (run / "sks.safetensors").exists()


def test_samples_written_every_n_steps_with_and_without_trigger(tmp_path, style_dir):
    seen = []

    class Rec(Callbacks):
        def on_sample(self, step, paths):
            seen.append((step, [p.name for p in paths]))
    train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
          cfg(tmp_path, steps=4, sample_every=2, sample_seeds=(7,)), callbacks=Rec())
    assert [s for s, _ in seen] == [0, 2, 4]                 # step 0: the base itself, to compare with
    assert seen[1][1] == ["step-000002-seed7-0.png", "step-000002-seed7-1.png"]
    run = tmp_path / "out" / "zqx"
    first_caption = next(iter(json.loads((run / "config.json").read_text())["captions"].values()))
    base0 = np.asarray(Image.open(run / "samples" / "step-000000-seed7-0.png"))
    from sdlora.config import GenerateConfig
    from sdlora.generate import Generator
    alone = np.asarray(Generator(tiny_random_base()).generate(GenerateConfig(prompt=first_caption, seed=7)))
    assert np.array_equal(base0, alone)                        # step 0 is the base's own image
    assert not np.array_equal(base0, np.asarray(Image.open(run / "samples" / "step-000004-seed7-0.png")))


def test_prior_preservation_generates_class_images(tmp_path, style_dir):
    data = DataConfig(folder=str(style_dir), class_prompt="an image", num_class_images=2)
    res = train(data, LoraSpec(rank=2), cfg(tmp_path, steps=2))
    assert sorted(p.name for p in (res.run_dir / "class_images").iterdir()) == ["class-0000.png", "class-0001.png"]
    assert res.lora_path.is_file()


def test_run_says_where_it_runs_and_its_peak_memory(tmp_path, style_dir):
    """The user is told the run folder, device, attention kernel and optimizer at the start, and the peak memory."""
    import resource

    cb = Messages()
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path, steps=2), callbacks=cb)
    assert cb.lines[0] == f"run folder {res.run_dir}"
    summary = next(line for line in cb.lines if line.startswith("device "))
    n = torch.get_num_threads()
    assert f"({n} thread{'s' * (n != 1)})" in summary and "base weights fp32," in summary
    assert "attention AttnProcessor2_0 (PyTorch scaled_dot_product_attention" in summary
    assert "optimizer torch.AdamW" in summary and "gradient checkpointing off" in summary
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # a torch process holds > 100 MiB; VmHWM and getrusage's maxrss are two kernel counters of the
    # same peak that can differ by some pages, hence the 1% margin
    assert 100 * 2**20 < res.peak_memory_bytes <= 1.01 * peak_rss
    from sdlora.training.hardware import format_bytes
    assert f"peak resident memory of the process: {format_bytes(res.peak_memory_bytes)}" in cb.lines
    assert format_bytes(3 * 2**20) == "3 MiB" and format_bytes(3 * 2**30) == "3.00 GiB"


ISOLATION_PROMPTS = {"empty": [""], "untriggered": ["a square outline", "a circle outline"],
                     "triggered": ["zqx, a square outline", "zqx, a circle outline"]}


def prediction_change(lora, prompts: list[str]) -> float:
    """Mean squared change the LoRA at strength 1 makes to the tiny random U-Net's prediction for `prompts`, on
    fixed noisy latents at t=700."""
    from sdlora import Generator, LoraChoice
    gen = Generator(tiny_random_base())
    ids = gen.base.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(len(prompts), 4, 8, 8, generator=g), torch.full((len(prompts),), 700)
    out = []
    for strength in (0.0, 1.0):
        gen.set_loras([LoraChoice(str(lora), strength)])
        with torch.no_grad():
            out.append(gen.base.unet(x, t, gen.base.text_encoder(ids)[0]).sample)
    return float((out[1] - out[0]).pow(2).mean())


@pytest.mark.parametrize("images", ["base", "training"])
def test_trigger_isolation_keeps_the_empty_and_untriggered_prompts_as_the_base(tmp_path, style_dir, images):
    """With pass trigger_isolation (all four cross-attention projections adapted; the pass on every step, held on
    the base's own pictures or on the training images) the LoRA changes the prediction for the empty caption (the
    one guidance subtracts) and for the caption without the trigger much less than without it, and what change is
    left depends on the trigger."""
    figures = {}
    for weight in (0.0, 4.0):
        res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, cross_attention="qkvo"),
                    cfg(tmp_path, steps=30, lr=3e-3, trigger_isolation=weight, isolation="pass", isolation_every=1,
                        isolation_images=images, run_name=f"iso{weight:g}"))
        figures[weight] = {k: prediction_change(res.lora_path, p) for k, p in ISOLATION_PROMPTS.items()}
    print(figures)
    assert figures[4.0]["empty"] < 0.2 * figures[0.0]["empty"]
    assert figures[4.0]["untriggered"] < 0.5 * figures[0.0]["untriggered"]
    # what is left of the change is the trigger's: selective, where without isolation it is not
    selectivity = {w: f["triggered"] / f["untriggered"] for w, f in figures.items()}
    assert selectivity[4.0] > 1.3 * selectivity[0.0]


def test_learning_rate_is_the_bases_recommendation_unless_set(tmp_path, style_dir):
    """lr=None takes the base folder's build.json 'lora_lr' (the built-in base: 3e-3), else 1e-4; the run
    records and reports the rate it used."""
    from sdlora.config import DEFAULT_LR
    from sdlora.bases.load import base_lora_lr

    assert base_lora_lr("tiny") == 3e-3 and base_lora_lr("tiny-random") is None and DEFAULT_LR == 1e-4
    for lr, expected, source in ((None, DEFAULT_LR, "default for SD bases"), (3e-4, 3e-4, "set")):
        cb = Messages()
        res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                    cfg(tmp_path, steps=1, lr=lr, run_name=f"lr{lr}"), callbacks=cb)
        assert any(line.startswith(f"learning rate {expected:g} ({source}); steps 1 (set);") for line in cb.lines), \
            cb.lines
        assert json.loads((res.run_dir / "config.json").read_text())["train"]["lr"] == expected
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "build.json").write_text(json.dumps({"config": {"lora_lr": 5e-4}}))
    assert base_lora_lr(str(folder)) == 5e-4
    (folder / "build.json").write_text("{not json")
    assert base_lora_lr(str(folder)) is None


def test_steps_are_the_bases_recommendation_per_image_unless_set(tmp_path):
    """steps=None gives the base folder's build.json 'lora_steps_per_image' (the built-in base: 300) for each image,
    counted over 4 to 20 images, else 100 per image; the source goes in the run's report."""
    from sdlora.bases.load import base_steps_per_image
    from sdlora.config import default_steps
    from sdlora.training.plan import resolve

    assert base_steps_per_image("tiny") == 300 and base_steps_per_image("tiny-random") is None
    assert [default_steps(n) for n in (1, 4, 10, 20, 60)] == [400, 400, 1000, 2000, 2000]
    assert [default_steps(n, 300) for n in (1, 10, 60)] == [1200, 3000, 6000]
    base = tiny_random_base()
    _, cfg_, sources = resolve(LoraSpec(), TrainConfig(output_dir=str(tmp_path)), 10, base)
    assert cfg_.steps == 1000 and sources["steps"] == "100 per image, default for SD bases"
    base.lora_steps_per_image = 7
    _, cfg_, sources = resolve(LoraSpec(), TrainConfig(output_dir=str(tmp_path)), 10, base)
    assert cfg_.steps == 70 and sources["steps"] == "7 per image, recommended by the base"
    _, cfg_, sources = resolve(LoraSpec(), TrainConfig(output_dir=str(tmp_path), steps=5), 10, base)
    assert cfg_.steps == 5 and sources["steps"] == "set"
    folder = tmp_path / "base"
    folder.mkdir()
    for value, read in ((50, 50), (0, None), ("300", None), (True, None), (2.5, None), (10**6, None)):
        (folder / "build.json").write_text(json.dumps({"config": {"lora_steps_per_image": value}}))
        assert base_steps_per_image(str(folder)) == read, value
    checkpoint = tmp_path / "model.safetensors"     # a single-file checkpoint has no build.json: 100 per image
    checkpoint.write_bytes(b"not read")
    assert base_steps_per_image(str(checkpoint)) is None


def test_word_dropout_trains_on_caption_variants_that_all_keep_the_trigger(tmp_path, style_dir):
    """With word_dropout each image has caption_variants captions (its own first), each with the
    trigger; a batch draws one of its image's variants, and the trigger-less captions follow them."""
    from sdlora import Callbacks
    t = _Trainer(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                 cfg(tmp_path, word_dropout=0.5, caption_variants=4), Callbacks(), None, None)
    t.setup(tmp_path / "run", None)
    n = len(t.plan.items)
    assert len(t.captions) == 4 * n and t.examples.ids.shape[0] == 4 * n and t.examples.embeds.hidden.shape[0] == 4 * n
    assert t.untriggered.ids.shape[0] == 4 * n + 1                        # + the empty caption
    assert all(c.startswith("zqx") for c in t.captions)
    assert [t.captions[4 * i] for i in range(n)] == [it.caption for it in t.plan.items]
    assert len(set(t.captions)) > n
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(40):
        lat, enc, idx = t.batches.draw(g, t.examples)
        i = int(idx[0])
        assert torch.equal(lat[0], t.examples.latents[i // 4][0]) or torch.equal(lat[0], t.examples.latents[i // 4][-1])
        assert torch.equal(enc.hidden[0], t.examples.embeds.hidden[i])
        seen.add(i % 4)
    assert seen == {0, 1, 2, 3}
    off = _Trainer(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path), Callbacks(), None, None)
    off.setup(tmp_path / "run2", None)
    assert len(off.captions) == n


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_key_value_isolation_penalty_is_the_mean_squared_change_of_the_untriggered_states(tiny_base, dora):
    """KeyValueIsolation's penalty, computed from the states' second moment once, equals the mean over the
    key/value modules of the squared change their adapters make to the untriggered token states' outputs, relative
    to those outputs' own square, measured by running the modules; with DoRA, whose magnitudes rescale every
    output, too."""
    from sdlora.training import adapters
    from sdlora.training.objective import KeyValueIsolation
    adapters.inject(tiny_base.unet, None, LoraSpec(rank=4, alpha=2.0, cross_attention="kv", use_dora=dora))
    names = [n for n, m in tiny_base.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))
             and hasattr(m, "lora_A")]
    layers = adapters.key_value_layers(tiny_base.unet)
    assert len(layers) == len(names) > 0
    states = torch.randn(3, 77, tiny_base.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    iso = KeyValueIsolation(layers, states)
    assert float(iso.penalty().detach()) == pytest.approx(0.0, abs=1e-12)   # B starts at zero: nothing changes yet
    g = torch.Generator().manual_seed(1)
    for _, b, _, _, magnitude in layers:
        b.data = torch.randn(b.shape, generator=g)
        assert (magnitude is not None) == dora
        if dora:                                                # rows rescaled by 0.8 to 1.2 of their norm
            magnitude.data = magnitude.data * (0.8 + 0.4 * torch.rand(magnitude.shape, generator=g))
    modules = dict(tiny_base.unet.named_modules())
    measured = []
    with torch.no_grad():
        for name in names:
            with_lora = modules[name](states)
            with adapters.adapters_off(tiny_base.unet):
                without = modules[name](states)
            bias = modules[name].get_base_layer().bias
            base_out = without if bias is None else without - bias
            measured.append(float((with_lora - without).pow(2).sum() / base_out.pow(2).sum()))
    assert float(iso.penalty().detach()) == pytest.approx(float(np.mean(measured)), rel=1e-4)


def test_text_isolation_adapts_keys_and_values_and_keeps_untriggered_prompts(tmp_path, style_dir):
    """cross_attention='kv' adapts only attn2.to_k / to_v; isolation='text' runs no second U-Net pass, and with it
    the LoRA changes the empty and the untriggered prompts' predictions far less than the triggered ones."""
    figures = {}
    for weight in (0.0, 10.0):
        res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, cross_attention="kv"),
                    cfg(tmp_path, steps=30, lr=3e-3, trigger_isolation=weight, isolation="text",
                        run_name=f"kv{weight:g}"))
        keys = load_file(str(res.lora_path))
        assert keys and all(("to_k" in k or "to_v" in k) for k in keys if k.endswith("lora_down.weight"))
        figures[weight] = {k: prediction_change(res.lora_path, p) for k, p in ISOLATION_PROMPTS.items()}
    print(figures)
    assert figures[10.0]["empty"] < 0.05 * figures[0.0]["empty"]
    assert figures[10.0]["untriggered"] < 0.2 * figures[10.0]["triggered"]
    assert figures[0.0]["untriggered"] > 0.5 * figures[0.0]["triggered"]      # without it: not selective


def test_text_isolation_refuses_adapters_it_cannot_hold_and_auto_picks_the_pass_for_them(tmp_path, style_dir):
    """isolation='text' with adapters that see more than the prompt (q/out, self-attention) or a training text
    encoder is refused before anything loads; 'auto' (the default) uses the pass for them, text otherwise."""
    from sdlora import ConfigError
    from sdlora.config import isolation_method
    data = DataConfig(folder=str(tmp_path / "not-read"), trigger="zqx")
    for spec, words in ((LoraSpec(rank=4, cross_attention="kv", text_encoder=True), "text encoder must stay frozen"),
                        (LoraSpec(rank=4), "attn2.to_q, attn2.to_out.0"),            # the default: q/k/v/out
                        (LoraSpec(rank=4, cross_attention="kv", self_attention=True), "attn1.to_q"),
                        (LoraSpec(rank=4, cross_attention="kv", adapter="adalora"), "adapter 'lora'")):
        with pytest.raises(ConfigError, match="isolation='text'") as err:
            train(data, spec, cfg(tmp_path, isolation="text"))
        assert words in str(err.value) and "--isolation pass" in str(err.value)
        assert isolation_method(spec, cfg(tmp_path)) == "pass"
    assert isolation_method(LoraSpec(rank=4, cross_attention="kv"), cfg(tmp_path)) == "text"
    assert isolation_method(LoraSpec(rank=4, cross_attention="kv"), cfg(tmp_path, isolation="pass")) == "pass"


def test_pass_isolation_every_n_steps_runs_the_second_pass_on_those_steps_only(tmp_path, style_dir, monkeypatch):
    """isolation_every=3: the U-Net sees a doubled batch (the captions with and without the trigger) on steps
    0 and 3 of 6, and a single one otherwise."""
    from sdlora.training.objective import Objective
    batches = []
    original = Objective.loss

    def loss(self, unet, bare_unet, lat, cond, g, plain=None, isolation_weight=None):
        batches.append((plain is not None, isolation_weight))
        return original(self, unet, bare_unet, lat, cond, g, plain, isolation_weight)

    monkeypatch.setattr(Objective, "loss", loss)
    train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4),
          cfg(tmp_path, steps=6, isolation="pass", isolation_every=3, trigger_isolation=2.0))
    assert batches == [(True, 6.0), (False, 6.0), (False, 6.0), (True, 6.0), (False, 6.0), (False, 6.0)]


class ToyUNet(torch.nn.Module):
    """A stand-in U-Net for the objective's arithmetic: a prediction that depends on the latents and the text."""

    def __init__(self, gain):
        super().__init__()
        self.gain = gain

    def forward(self, x, t, encoder_hidden_states):
        from types import SimpleNamespace
        return SimpleNamespace(sample=self.gain * x + encoder_hidden_states.mean(dim=(1, 2)).reshape(-1, 1, 1, 1))


def test_min_snr_weights_each_example_and_pass_isolation_keeps_its_own_weight():
    """With Min-SNR and pass isolation together, each example's squared error is weighted by its timestep's
    min(SNR, gamma) / SNR, and the untriggered half is added at the isolation weight (2 here), not at Min-SNR's."""
    from diffusers import DDPMScheduler

    from sdlora.training.batches import Cond
    from sdlora.training.objective import Objective

    sched = DDPMScheduler(num_train_timesteps=1000)
    toy, frozen = ToyUNet(0.5), ToyUNet(0.4)    # the trained U-Net, and the frozen base it is kept near
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = Cond(torch.full((3, 77, 8), 0.3))
    plain = Cond(torch.full((3, 77, 8), -0.2))
    objective = Objective(sched, "epsilon", TrainConfig(min_snr_gamma=5.0), torch.float32)
    got = objective.loss(toy, frozen, lat, cond, torch.Generator().manual_seed(7), lambda: (plain, plain, None), 2.0)

    noisy, t, noise = objective.noisy(lat, torch.Generator().manual_seed(7))
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = torch.clamp(snr, max=5.0) / snr
    assert not torch.allclose(w, torch.ones(3))             # the draw has timesteps Min-SNR weighs down
    main = ((toy(noisy, t, cond.hidden).sample - noise) ** 2).mean(dim=(1, 2, 3))
    kept = ((toy(noisy, t, plain.hidden).sample - frozen(noisy, t, plain.hidden).sample) ** 2).mean(dim=(1, 2, 3))
    assert float(kept.min()) > 0
    assert got.dim() == 0
    assert float(got) == pytest.approx(float((w * main).mean() + 2.0 * (w * kept).mean()), rel=1e-5)


def test_pass_isolation_holds_the_untriggered_captions_on_latents_of_their_own():
    """When `plain` gives latents (the base's own pictures), the untriggered half is those latents noised at the
    batch's timesteps with noise drawn after the batch's, and its target the frozen base's prediction there."""
    from diffusers import DDPMScheduler

    from sdlora.training.batches import Cond
    from sdlora.training.objective import Objective

    sched = DDPMScheduler(num_train_timesteps=1000)
    toy, frozen = ToyUNet(0.5), ToyUNet(0.4)
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pictures = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) + 3.0
    cond, plain = Cond(torch.full((2, 77, 8), 0.3)), Cond(torch.full((2, 77, 8), -0.2))
    objective = Objective(sched, "epsilon", TrainConfig(), torch.float32)
    got = objective.loss(toy, frozen, lat, cond, torch.Generator().manual_seed(7), lambda: (plain, plain, pictures), 2.0)
    own = objective.loss(toy, frozen, lat, cond, torch.Generator().manual_seed(7), lambda: (plain, plain, None), 2.0)

    g = torch.Generator().manual_seed(7)
    noisy, t, noise = objective.noisy(lat, g)
    held = sched.add_noise(pictures, torch.randn(pictures.shape, generator=g), t)
    main = ((toy(noisy, t, cond.hidden).sample - noise) ** 2).mean()
    kept = ((toy(held, t, plain.hidden).sample - frozen(held, t, plain.hidden).sample) ** 2).mean()
    assert float(got) == pytest.approx(float(main + 2.0 * kept), rel=1e-5)
    assert abs(float(got) - float(own)) > 1e-3 * float(own)         # not the batch's own latents


def test_pass_isolation_draws_the_bases_pictures_once_and_a_resumed_run_reads_them_back(tmp_path, style_dir):
    """The default (q/k/v/out, pass isolation on the base's pictures) draws, before training, the base's picture
    of each image's caption without the trigger and of the empty caption: PNGs in isolation_images/ that are the
    images the base itself draws for those prompts and seeds, and the latents a resumed run reads back."""
    from sdlora import Generator, GenerateConfig
    from sdlora.data import scan

    cb, stop = Messages(), threading.Event()
    stopper = StopAt(3, stop)
    stopper.on_message = cb.on_message
    data = DataConfig(folder=str(style_dir), trigger="zqx")
    part = train(data, LoraSpec(rank=2), cfg(tmp_path, steps=6, run_name="pics"), callbacks=stopper, cancel=stop)
    folder = part.run_dir / "isolation_images"
    items, _ = scan.scan_dataset(style_dir, "zqx", "{trigger}", 64)
    n = len(items)
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(
        f"{i:04d}-{kind}.png" for i in range(n) for kind in ("captioned", "empty"))
    assert sum("drew the base's picture" in line for line in cb.lines) == 1
    config = json.loads((part.run_dir / "config.json").read_text())
    captions = [config["captions"][it.path.name] for it in items]
    prompts = [scan.without_trigger(c, "zqx") for c in captions]
    assert all(p and "zqx" not in p for p in prompts)
    # generation's defaults (25 steps, guidance 7.5), each image's index as seed, drawn in one batch
    cfgs = [GenerateConfig(prompt=p, seed=i, width=64, height=64) for ps in (prompts, [""] * n) for i, p in enumerate(ps)]
    want = [np.asarray(im, dtype=float) for im in Generator("tiny-random").generate_many(cfgs)]
    kept = [np.asarray(Image.open(folder / f"{i:04d}-{kind}.png"), dtype=float)
            for kind in ("captioned", "empty") for i in range(n)]
    for k, (a, b) in enumerate(zip(kept, want)):
        assert np.abs(a - b).max() <= 1, k             # the base's picture of that prompt and seed
        assert np.abs(a - want[(k + 1) % (2 * n)]).mean() > 5, k      # and no other's
    from sdlora.runs import read_run_config
    assert read_run_config(part.run_dir)[2].isolation_images == "base"
    older = tmp_path / "older"                 # a run folder written before the setting existed held the training images
    older.mkdir()
    del config["train"]["isolation_images"]
    (older / "config.json").write_text(json.dumps(config))
    assert read_run_config(older)[2].isolation_images == "training"
    latents = load_file(str(folder / "latents.safetensors"))
    assert len(latents) == 2 * n and latents["captioned.0"].shape == (4, 8, 8)
    stamp = (folder / "latents.safetensors").stat().st_mtime_ns
    cb.lines.clear()
    resumed = train(None, resume=part.run_dir, callbacks=cb)
    assert resumed.steps_done == 6
    assert not any("drew the base's picture" in line for line in cb.lines)
    assert (folder / "latents.safetensors").stat().st_mtime_ns == stamp
