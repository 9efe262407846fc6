"""Shared fixtures: tiny SD-architecture models with random weights and small image folders.

Nothing here downloads anything; every model is built from configs with a fixed seed.
"""
from __future__ import annotations

import os
from pathlib import Path

# One intra-op thread: the test models are tiny, and with two OpenMP threads on a 2-core
# machine that has any other load, each small op waits on the other thread (measured: one
# tiny training 1.2 s with 1 thread, 164 s with 2). Child processes (CLI, web app) inherit it.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The longest file first. `make test` runs files in two processes (--dist loadfile), handed out in the order
# collected; the style test (default LoRAs of 3,000 steps on `tiny`, minutes each), collected last, would run on
# its own after the rest had finished; collected first it runs beside them (with two such LoRAs the suite took
# 14 min 6 s collected last, 14 min 0 s first: both processes were busy to the end either way).
LONGEST_FIRST = ("test_style_learning.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in LONGEST_FIRST)   # stable: the order within each part is kept


# Strength calibration draws training captions at three strengths after every training. Tests that train for
# another reason run that whole path on 2 captions of 4 sampling steps (a tiny-random run of 6 steps spent
# 1.4 s training and 5.5 s calibrating); test_calibrate checks the choice itself, and the style test
# measures with the real count and the base's own sampling.
FULL_CALIBRATION = {"test_calibrate.py", "test_style_learning.py"}


@pytest.fixture(autouse=True)
def _calibration_on_two_captions(request, monkeypatch):
    if Path(str(request.fspath)).name not in FULL_CALIBRATION:
        from sdlora.training import calibrate
        monkeypatch.setattr(calibrate, "N_CAPTIONS", 2)
        monkeypatch.setattr(calibrate, "SAMPLING", (4, calibrate.SAMPLING[1]))


@pytest.fixture
def tiny_base():
    """A fresh tiny-random base (64 px, 7 transformer blocks); each test may modify it."""
    from sdlora.bases.load import tiny_random_base
    return tiny_random_base()


def make_style_images(folder: Path, n: int = 4, size: int = 64, captions: bool = True) -> Path:
    """n images of one 'style' (dark background, bright outlined shapes), with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(255, 40, 40), (40, 255, 40), (60, 120, 255), (255, 220, 30), (220, 60, 255)]
    for i in range(n):
        img = Image.new("RGB", (size, size), (10, 10, 20))
        d = ImageDraw.Draw(img)
        c = colours[i % len(colours)]
        box = (8 + 2 * i, 10 + i, size - 10 - i, size - 8 - 2 * i)
        (d.ellipse if i % 2 else d.rectangle)(box, outline=c, width=3)
        img.save(folder / f"img {i}.png")
        if captions:
            (folder / f"img {i}.txt").write_text(f"a {'circle' if i % 2 else 'square'} outline", encoding="utf-8")
    return folder


@pytest.fixture
def style_dir(tmp_path) -> Path:
    return make_style_images(tmp_path / "style")
