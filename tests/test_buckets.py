"""Aspect-ratio buckets and the caption recipes (tag shuffling, caption dropout), on the real training path."""
from __future__ import annotations

import json
import math
import random
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from sdkit import StopAt
from sdlora import Callbacks, DataConfig, LoraSpec, TrainConfig, train
from sdlora.data import buckets
from sdlora.data.captions import caption_variants, shuffle_tags
from sdlora.data.images import load_image
from sdlora.training.loop import _Trainer

SHAPES = {"tall": (60, 110), "wide": (120, 66), "square": (80, 80), "tall2": (64, 100), "wide2": (110, 70)}


def mixed_shapes(folder: Path) -> Path:
    """Portrait, landscape and square images (each a frame, so a crop shows), with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, size) in enumerate(SHAPES.items()):
        img = Image.new("RGB", size, (10, 10, 20))
        ImageDraw.Draw(img).rectangle((2, 2, size[0] - 3, size[1] - 3), outline=(250, 40 * i, 40), width=3)
        img.save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"zqx, a {name} frame, red, thin line", encoding="utf-8")
    return folder


def test_buckets_cover_the_area_in_multiples_of_the_unet_step():
    for res, step in ((512, 64), (768, 64), (64, 16)):
        sizes = buckets.bucket_sizes(res, step)
        assert (res, res) in sizes
        for w, h in sizes:
            assert w % step == 0 and h % step == 0 and w * h <= res * res
            assert max(w, h) / min(w, h) <= buckets.MAX_BUCKET_ASPECT
            assert w * h > res * res - step * max(w, h)        # the area is used up to one step of a side
        assert sizes == sorted(sizes, key=lambda b: b[0] / b[1]) and len(set(sizes)) == len(sizes)


@pytest.mark.parametrize("size", [(600, 900), (1024, 768), (500, 500), (300, 1400), (1920, 1080), (777, 555)])
def test_each_image_keeps_as_much_as_any_bucket_would_let_it(size):
    """The chosen bucket is the nearest in aspect ratio, so the crop cuts no more than rounding to a bucket
    forces: no other bucket keeps more of the image, and the kept part has the bucket's shape."""
    sizes = buckets.bucket_sizes(512, 64)
    fit = buckets.fit(size, sizes)
    left, top, right, bottom = fit.crop
    kept = (right - left) * (bottom - top) / (size[0] * size[1])

    def keeps(b):
        a, ab = size[0] / size[1], b[0] / b[1]
        return min(a / ab, ab / a)
    assert kept == pytest.approx(keeps(fit.bucket), abs=0.01)
    assert keeps(fit.bucket) >= max(keeps(b) for b in sizes) - 1e-9
    assert (right - left) / (bottom - top) == pytest.approx(fit.bucket[0] / fit.bucket[1], rel=0.02)
    px = max(size[0] / fit.bucket[0], size[1] / fit.bucket[1])           # one trained px, in the original's
    assert abs(left - (size[0] - right)) <= 2 * px and abs(top - (size[1] - bottom)) <= 2 * px   # centred


def test_the_image_as_trained_is_the_bucket_sized_crop(tmp_path):
    folder = mixed_shapes(tmp_path / "d")
    sizes = buckets.bucket_sizes(64, 16)
    for name, size in SHAPES.items():
        fit = buckets.fit(size, sizes)
        img = load_image(folder / f"{name}.png", 64, fit.bucket)
        assert img.size == fit.bucket
        assert (fit.bucket[0] < fit.bucket[1]) == (size[0] < size[1]) or fit.bucket[0] == fit.bucket[1]
    square = load_image(folder / "square.png", 64)
    assert square.size == (64, 64)


def cfg(tmp_path, **kw):
    kw = {"base": "tiny-random", "steps": 4, "lr": 1e-2, "sample_every": 0, "output_dir": str(tmp_path / "out"),
          "batch_size": 2, "checkpoint_every": 1, **kw}
    return TrainConfig(**kw)


def test_each_image_trains_at_its_own_shape_in_batches_of_one_bucket(tmp_path):
    folder = mixed_shapes(tmp_path / "d")
    res = train(DataConfig(folder=str(folder), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path, run_name="b"))
    config = json.loads((res.run_dir / "config.json").read_text())
    for name, size in SHAPES.items():
        entry = config["images"][f"{name}.png"]
        w, h = entry["bucket"]
        assert w % 16 == 0 and h % 16 == 0 and w * h <= 64 * 64
        assert math.copysign(1, w - h) == math.copysign(1, size[0] - size[1]) or w == h
        left, top, right, bottom = entry["crop"]
        assert (right - left) * (bottom - top) >= 0.85 * size[0] * size[1]     # only the rounding is cut
    assert len({tuple(e["bucket"]) for e in config["images"].values()}) >= 3

    t = _Trainer(DataConfig(folder=str(folder), trigger="zqx"), LoraSpec(rank=2), cfg(tmp_path), Callbacks(), None,
                 None)
    t.setup(tmp_path / "probe", None)
    shapes = [tuple(lat.shape[-2:]) for lat in t.examples.latents]
    assert shapes == [(f.bucket[1] // 8, f.bucket[0] // 8) for f in t.plan.fits]
    g, seen = torch.Generator().manual_seed(0), set()
    for _ in range(60):
        lat, _, idx = t.batches.draw(g, t.examples)
        assert lat.shape[0] == 2 and len({t.plan.fits[i].bucket for i in idx.tolist()}) == 1
        seen.add(tuple(lat.shape[-2:]))
    assert seen == set(shapes)


def test_a_bucketed_run_resumed_ends_with_the_same_weights(tmp_path):
    folder = mixed_shapes(tmp_path / "d")
    data = DataConfig(folder=str(folder), trigger="zqx")
    whole = train(data, LoraSpec(rank=2), cfg(tmp_path, run_name="whole"))
    cancel = threading.Event()

    stopped = train(data, LoraSpec(rank=2), cfg(tmp_path, run_name="stopped"), callbacks=StopAt(2, cancel),
                    cancel=cancel)
    assert stopped.cancelled
    resumed = train(None, resume=stopped.run_dir)
    a, b = load_file(str(whole.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_no_buckets_keeps_the_square_crop(tmp_path):
    folder = mixed_shapes(tmp_path / "d")
    t = _Trainer(DataConfig(folder=str(folder), trigger="zqx", buckets=False), LoraSpec(rank=2), cfg(tmp_path),
                 Callbacks(), None, None)
    assert {f.bucket for f in t.plan.fits} == {(64, 64)}
    assert t.plan.buckets == "64x64: 5 images"


def test_tag_shuffling_keeps_the_first_tags_and_the_trigger_in_place():
    caption = "mystyle, watercolor, a cat, soft light, paper texture, blue"
    rng = random.Random(0)
    for keep in (0, 1, 2):
        orders = set()
        for _ in range(30):
            out = shuffle_tags(caption, "mystyle", keep, rng).split(", ")
            assert out[0] == "mystyle" and out[:keep] == caption.split(", ")[:keep]
            assert sorted(out) == sorted(caption.split(", "))
            orders.add(tuple(out))
        assert len(orders) > 5
    variants = caption_variants([caption, "mystyle, ink"], "mystyle", 0.0, 4, seed=1, shuffle=True, keep=2)
    assert len(variants) == 8 and variants[0] == caption and variants[4] == "mystyle, ink"
    assert all(v.startswith("mystyle, watercolor, ") for v in variants[:4]) and len(set(variants[:4])) > 1


def test_caption_dropout_trains_that_share_on_the_empty_caption(tmp_path, style_dir):
    t = _Trainer(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                 cfg(tmp_path, caption_dropout=0.5, batch_size=64), Callbacks(), None, None)
    t.setup(tmp_path / "run", None)
    g = torch.Generator().manual_seed(0)
    _, cond, _ = t.batches.draw(g, t.examples)
    dropped = t.untriggered.drop_captions(g, cond, 0.5).hidden
    enc = cond.hidden
    empty = t.untriggered.embeds.hidden[-1]
    is_empty = torch.tensor([torch.equal(row, empty) for row in dropped])
    assert 16 <= int(is_empty.sum()) <= 48                       # about half of 64
    assert all(torch.equal(d, e) for d, e, gone in zip(dropped, enc, is_empty) if not gone)
    assert torch.equal(t.untriggered.drop_captions(g, cond, 0.0).hidden, enc)
    result = train(DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=2),
                   cfg(tmp_path, caption_dropout=0.5, shuffle_tags=True, keep_tags=1, run_name="recipes"))
    assert result.lora_path.is_file()


def test_the_cli_prints_the_buckets_before_training(tmp_path, capsys):
    from sdlora.cli import main
    folder = mixed_shapes(tmp_path / "d")
    code = main(["train", "--data", str(folder), "--trigger", "zqx", "--base", "tiny-random", "--steps", "1",
                 "--sample-every", "0", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    first = err.splitlines()[0]
    assert first.startswith("5 images, 1 steps at 64px; buckets ") and "64x64: 1 image" in first, first
    assert "48x80: 2 images" in first and "80x48: 2 images" in first


def test_a_run_started_before_buckets_resumes_on_square_crops(tmp_path):
    """A config.json without the buckets setting is from a version that cropped every image to a square."""
    from sdlora.runs import read_run_config
    folder = mixed_shapes(tmp_path / "d")
    cancel = threading.Event()

    stopped = train(DataConfig(folder=str(folder), trigger="zqx", buckets=False), LoraSpec(rank=2),
                    cfg(tmp_path, run_name="old"), callbacks=StopAt(1, cancel), cancel=cancel)
    path = stopped.run_dir / "config.json"
    config = json.loads(path.read_text())
    del config["data"]["buckets"]
    path.write_text(json.dumps(config))
    assert read_run_config(stopped.run_dir)[0].buckets is False
    assert train(None, resume=stopped.run_dir).lora_path.is_file()
