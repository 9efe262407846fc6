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


def test_image_stats_are_each_channels_mean_and_spread_then_luminance_texture_per_scale():
    img = torch.zeros(2, 3, 8, 8)
    img[0, 0] = torch.tensor([[1.0, 0.0] * 4, [0.0, 1.0] * 4] * 4)     # red: a 1 px checkerboard
    img[0, 1] = 0.5                                                     # green: flat
    img[1, 2] = torch.tensor([1.0, 1.0, 0.0, 0.0] * 2)                  # blue: stripes 2 px on, 2 px off, across
    stats = calibrate.image_stats(img)                                 # 8 px: scales 1 to 8 // 16, so 1 alone
    assert stats.shape == (2, 9)
    stats = calibrate.image_stats(img, (1, 2, 4))
    assert stats.shape == (2, 11)
    mean, spread, chroma, texture = stats[:, :3], stats[:, 3:6], stats[:, 6:8], stats[:, 8:]
    assert mean[0].tolist() == pytest.approx([0.5, 0.5, 0.0]) and mean[1].tolist() == pytest.approx([0, 0, 0.5])
    assert spread[0].tolist() == pytest.approx([float(img[0, 0].std()), 0, 0])
    # image 0's pixels are (1, 0.5, 0) or (0, 0.5, 0): chroma 1 or 0.5 in equal shares; image 1's 1 or 0
    assert chroma.flatten().tolist() == pytest.approx([0.75, float(torch.tensor([1.0, 0.5] * 32).std()),
                                                       0.5, float(torch.tensor([1.0, 0.0] * 32).std())])
    r, b = calibrate.LUMA[0], calibrate.LUMA[2]
    # the checkerboard changes at every pixel (across and down) and averages away over 2 px blocks
    assert texture[0].tolist() == pytest.approx([2 * r, 0, 0], abs=1e-6)
    # the stripes change at 3 of 7 steps across at 1 px, at every step over 2 px blocks, not over 4 px blocks
    assert texture[1].tolist() == pytest.approx([3 / 7 * b, b, 0], abs=1e-6)


def test_texture_is_measured_from_a_pixel_up_to_a_sixteenth_of_the_image():
    assert calibrate.texture_scales(64) == (1, 2, 4)                    # `tiny`
    assert calibrate.texture_scales(512) == (1, 2, 4, 8, 16, 32)        # SD 1.5
    assert calibrate.texture_scales(1024)[-1] == 64 and calibrate.texture_scales(63) == (1, 2)
    assert calibrate.texture_scales(8) == (1,)


def test_distance_is_zero_for_the_training_images_and_grows_with_the_gap():
    trained = calibrate.image_stats(torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert calibrate.distance(trained, trained) == 0
    near, far = calibrate.distance(trained + 0.01, trained), calibrate.distance(trained + 0.05, trained)
    assert 0 < near < far and far == pytest.approx(25 * near, rel=1e-4)


@pytest.mark.parametrize("trained_at, picked", [(0.5, 0.5), (0.75, 0.75), (1.0, 1.0), (0.87, 1.0)])
def test_calibrate_picks_the_strength_whose_samples_look_like_the_training_images(trained_at, picked):
    """0.87: 0.75 is closer, but not clearly (under 0.8 of strength 1's distance): the file stays as trained.
    The style tints the images and adds 1 px dots, both in proportion to the strength."""
    g = torch.Generator().manual_seed(1)
    start = [0.3 + 0.2 * torch.rand(3, 16, 16, generator=g) for _ in range(6)]
    dots = torch.zeros(3, 16, 16)
    dots[:, ::2, ::2] = 0.3
    style = torch.tensor([0.2, -0.1, 0.05])[:, None, None] + dots
    captions = [f"zqx, image {i}" for i in range(6)]
    drawn = []

    def draw(requests: list[tuple[str, int]], strength: float) -> list[torch.Tensor]:
        drawn.extend((caption, seed, strength) for caption, seed in requests)
        return [(start[captions.index(caption)] + strength * style)[None] for caption, _ in requests]

    found = calibrate.calibrate(draw, captions, [s + trained_at * style for s in start], (20, 5.0), seed=7)
    assert found.strength == picked
    assert sorted(found.distances) == sorted(calibrate.STRENGTHS)
    assert found.distances[picked] == pytest.approx(0, abs=1e-9) if picked == trained_at else \
        calibrate.CLEARLY_CLOSER * found.distances[1.0] < found.distances[0.75] < found.distances[1.0]
    assert len(drawn) == 6 * len(calibrate.STRENGTHS) and {s for _, s, _ in drawn} == set(range(7, 13))
    assert "guidance 5" in found.describe()


def test_calibration_compares_the_samples_with_the_training_images_as_the_vae_gives_them_back(tiny_base):
    """The loop's targets: each training image's cached latents decoded; for an image the VAE keeps well,
    close to the image itself."""
    from sdlora.training.batches import Batches
    batches = Batches(tiny_base, torch.device("cpu"), batch_size=1, flip=False, text_encoder_trains=False)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    back = batches.decode_latents(batches.encode_pixels(x * 2 - 1))
    assert back.shape == x.shape and 0 <= float(back.min()) and float(back.max()) <= 1
    with torch.no_grad():
        expected = tiny_base.vae.decode(tiny_base.vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5
    torch.testing.assert_close(back, expected.clamp(0, 1), rtol=1e-4, atol=1e-5)


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


def test_images_of_different_buckets_are_measured_at_the_same_scales():
    """Training images of several shapes: every image's texture is measured over the same block sizes (those
    of the smallest side), so their statistics line up."""
    g = torch.Generator().manual_seed(2)
    start = [torch.rand(3, h, w, generator=g) * 0.5 for h, w in ((64, 64), (32, 48), (48, 32))]
    style = torch.tensor([0.3, 0.1, -0.1])[:, None, None]
    captions = ["zqx, a", "zqx, b", "zqx, c"]

    def draw(requests: list[tuple[str, int]], strength: float) -> list[torch.Tensor]:
        return [(start[captions.index(caption)] + strength * style).clamp(0, 1)[None] for caption, _ in requests]

    found = calibrate.calibrate(draw, captions, [(s + 0.5 * style).clamp(0, 1) for s in start], (20, 5.0))
    assert found.strength == 0.5 and found.distances[0.5] == pytest.approx(0, abs=1e-9)
