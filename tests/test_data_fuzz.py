"""Property test: whatever bytes a file holds, scanning never raises.

Random bytes and mutated valid PNG/JPEG/GIF/WebP files are written as image
files; each must end up either as an Item or as a fatal Problem naming it.
Bounded (60 examples, small files) so it runs in a few seconds.
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdlora.data.scan import load_image, scan_dataset, to_tensor


def _seed_files() -> list[bytes]:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8))
    out = []
    for fmt, kw in (("PNG", {}), ("JPEG", {"quality": 80}), ("GIF", {}), ("WEBP", {"quality": 80})):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out.append(buf.getvalue())
    rgba = io.BytesIO()
    img.convert("RGBA").save(rgba, "PNG")  # a second PNG layout: alpha channel
    out.append(rgba.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated(draw) -> bytes:
    """A valid file with a few bytes overwritten, a slice cut out, or its end cut off."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "truncate", "insert"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[i: i + draw(st.integers(1, 64))]
        elif op == "truncate":
            del data[i:]
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


file_bytes = st.one_of(st.binary(max_size=512), mutated())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents=st.lists(file_bytes, min_size=1, max_size=3), names=st.sampled_from([".png", ".jpg", ".gif", ""]))
def test_any_bytes_become_an_item_or_a_problem(contents, names):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = [folder / f"f{i}{names}" for i in range(len(contents))]
        for p, data in zip(paths, contents):
            p.write_bytes(data)
        items, problems = scan_dataset(folder, "sks", resolution=16)
        used = {str(i.path) for i in items}
        fatal = {p.path for p in problems if p.fatal}
        for p in paths:
            assert (str(p) in used) != (str(p) in fatal), f"{p.name} must be used or refused, not both/neither"
        for item in items:  # what the scan accepted must load for training
            t = to_tensor(load_image(item.path, 16))
            assert t.shape == (3, 16, 16) and float(t.abs().max()) <= 1.0
