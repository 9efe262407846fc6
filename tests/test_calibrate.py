"""Strength calibration: the strength whose samples come closest to the training images becomes the file's 1."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdlora import Callbacks, DataConfig, LoraSpec, TrainConfig, train
from sdlora.training import calibrate


class Said(Callbacks):
    def __init__(self):
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def test_latent_stats_are_each_channels_mean_spread_and_grain():
    lat = torch.zeros(1, 2, 4, 4)
    lat[0, 0] = torch.tensor([[1.0, -1.0] * 2, [-1.0, 1.0] * 2] * 2)   # a checkerboard of +-1
    lat[0, 1] = 3.0                                                    # flat
    stats = calibrate.latent_stats(lat)
    mean, spread, grain = stats[0, :2], stats[0, 2:4], stats[0, 4:]
    assert mean.tolist() == pytest.approx([0.0, 3.0])
    assert spread[0] == pytest.approx(float(lat[0, 0].std())) and spread[1] == 0
    assert grain.tolist() == pytest.approx([4.0, 0.0])                  # |+-2| across plus |+-2| down


def test_distance_is_zero_for_the_training_images_and_grows_with_the_gap():
    trained = calibrate.latent_stats(torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert calibrate.distance(trained, trained) == 0
    near, far = calibrate.distance(trained + 0.1, trained), calibrate.distance(trained + 0.5, trained)
    assert 0 < near < far and far == pytest.approx(25 * near, rel=1e-4)


@pytest.mark.parametrize("trained_at, picked", [(0.5, 0.5), (0.75, 0.75), (1.0, 1.0), (0.87, 1.0)])
def test_calibrate_picks_the_strength_whose_samples_look_like_the_training_images(trained_at, picked):
    """0.87: 0.75 is closer, but not clearly (under 0.8 of strength 1's distance): the file stays as trained."""
    g = torch.Generator().manual_seed(1)
    start = [torch.randn(4, 8, 8, generator=g) for _ in range(6)]
    style = torch.randn(4, 1, 1, generator=g) * 2 + torch.randn(4, 8, 8, generator=g)
    captions = [f"zqx, image {i}" for i in range(6)]
    drawn = []

    def draw(caption: str, seed: int, strength: float) -> torch.Tensor:
        drawn.append((caption, seed, strength))
        return (start[captions.index(caption)] + strength * style)[None]

    found = calibrate.calibrate(draw, captions, [s + trained_at * style for s in start], (20, 5.0), seed=7)
    assert found.strength == picked
    assert sorted(found.distances) == sorted(calibrate.STRENGTHS)
    assert found.distances[picked] == 0 if picked == trained_at else \
        calibrate.CLEARLY_CLOSER * found.distances[1.0] < found.distances[0.75] < found.distances[1.0]
    assert len(drawn) == 6 * len(calibrate.STRENGTHS) and {s for _, s, _ in drawn} == set(range(7, 13))
    assert "guidance 5" in found.describe()


def test_the_file_is_the_trained_update_scaled_by_the_calibrated_strength(tmp_path, style_dir, monkeypatch):
    monkeypatch.setattr(calibrate, "STRENGTHS", (0.5,))                 # the only candidate: the file must halve
    cb = Said()
    messages = cb.messages
    common = dict(base="tiny-random", steps=6, lr=1e-3, sample_every=0, output_dir=str(tmp_path / "out"))
    data = DataConfig(folder=str(style_dir), trigger="zqx")
    plain = train(data, LoraSpec(rank=4), TrainConfig(**common, calibrate_strength=False), callbacks=cb)
    assert not any("strength calibration" in m for m in messages)
    calibrated = train(data, LoraSpec(rank=4), TrainConfig(**common), callbacks=cb)
    said = [m for m in messages if m.startswith("strength calibration")]
    assert len(said) == 1 and "trained update x 0.5" in said[0]
    a, b = load_file(str(plain.lora_path)), load_file(str(calibrated.lora_path))
    assert a.keys() == b.keys()
    ups = [k for k in a if k.endswith(".lora_up.weight")]
    assert ups and any(a[k].abs().max() > 0 for k in ups)
    for k in a:
        if k.endswith(".lora_up.weight"):
            torch.testing.assert_close(b[k].float(), 0.5 * a[k].float(), rtol=2e-3, atol=1e-6)
        else:                                                          # down weights and alphas as trained
            torch.testing.assert_close(b[k], a[k])
    with safe_open(str(calibrated.lora_path), "pt") as f:
        assert f.metadata()["sdlora_strength_scale"] == "0.5"
    with safe_open(str(plain.lora_path), "pt") as f:
        assert "sdlora_strength_scale" not in f.metadata()


def test_dora_files_are_not_calibrated_and_the_run_says_so(tmp_path, style_dir):
    cb = Said()
    res = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4, use_dora=True),
                TrainConfig(base="tiny-random", steps=2, lr=1e-3, sample_every=0, output_dir=str(tmp_path / "o")),
                callbacks=cb)
    assert any(m.startswith("strength calibration: skipped") and "DoRA" in m for m in cb.messages)
    with safe_open(str(res.lora_path), "pt") as f:
        assert "sdlora_strength_scale" not in f.metadata()
