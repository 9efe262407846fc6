"""Dataset scanning and image loading: every bad-input case from USERS.md, built in tmp_path.

Images are tiny (a few pixels to 64 px) and scans use a matching small
resolution, so the whole file runs in a few seconds on a CPU.
"""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile, features

from sdlora.data.scan import (DatasetError, Item, caption_for, load_image, require_trainable,
                         scan_dataset, to_tensor)
from sdlora.data.images import MAX_PIXELS, to_rgb

RES = 32  # training resolution used by most scans here


# ---------- helpers that build files ----------

def noise(w: int = RES, h: int = RES, seed: int = 0) -> Image.Image:
    """A distinct RGB image per seed (so no two count as duplicates)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def quadrants(size: int = 8) -> np.ndarray:
    """(size, size, 3) uint8 with four different corner colours: every flip/rotation is distinguishable."""
    a = np.zeros((size, size, 3), np.uint8)
    half = size // 2
    a[:half, :half] = (255, 0, 0)
    a[:half, half:] = (0, 255, 0)
    a[half:, :half] = (0, 0, 255)
    a[half:, half:] = (255, 255, 0)
    return a


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, row: bytes) -> bytes:
    """A PNG whose every row is `row` (filter byte 0 prepended), compressed in a stream so a
    30000x30000 file is a few hundred KB and never held uncompressed in memory."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    z = zlib.compressobj(9)
    line = b"\x00" + row
    per_block = max(1, 4_000_000 // len(line))
    idat, left = [], height
    while left:
        n = min(per_block, left)
        idat.append(z.compress(line * n))
        left -= n
    idat.append(z.flush())
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(idat))
            + png_chunk(b"IEND", b""))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def good_folder(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = [folder / f"img{i:03d}.png" for i in range(n)]
    for i, p in enumerate(paths):
        noise(seed=100 + i).save(p)
    return paths


def scan(folder: Path, **kw):
    kw.setdefault("resolution", RES)
    return scan_dataset(folder, "sks", **kw)


def problem_for(problems, path: Path):
    found = [p for p in problems if p.path == str(path)]
    assert len(found) == 1, f"expected one problem for {path.name}, got {found}"
    return found[0]


# ---------- scanning: which files count ----------

def test_good_folder_sorted_with_unicode_names_and_captions(tmp_path):
    noise(seed=1).save(tmp_path / "cat 1.png")
    (tmp_path / "cat 1.txt").write_text("sks, a cat on a mat", encoding="utf-8")
    noise(seed=2).save(tmp_path / "café ☕ 2.jpg", quality=95)
    noise(seed=3).save(tmp_path / "Zebra.webp", lossless=True)
    items, problems = scan(tmp_path)
    assert problems == []
    assert [i.path.name for i in items] == ["Zebra.webp", "caf\u00e9 \u2615 2.jpg", "cat 1.png"]
    by_name = {i.path.name: i for i in items}
    assert (by_name["cat 1.png"].caption, by_name["cat 1.png"].caption_source) == ("sks, a cat on a mat", "file")
    assert (by_name["Zebra.webp"].caption, by_name["Zebra.webp"].caption_source) == ("an image in sks style", "template")
    assert all(isinstance(i, Item) and i.size == (RES, RES) and i.notes == [] for i in items)
    assert scan(tmp_path) == (items, problems)  # deterministic


def test_content_not_extension_decides(tmp_path):
    good_folder(tmp_path)
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "doc.pdf").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    noise(seed=9).save(tmp_path / "real_png_named.jpg", format="PNG")   # wrong extension, valid image
    (tmp_path / "orphan.txt").write_text("a caption with no image")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (tmp_path / "Thumbs.db").write_bytes(bytes(64))
    items, problems = scan(tmp_path)
    assert "real_png_named.jpg" in [i.path.name for i in items]
    assert len(problems) == 3 and all(p.fatal for p in problems)
    assert "not an image" in problem_for(problems, tmp_path / "notes.png").reason
    assert "text" in problem_for(problems, tmp_path / "notes.png").reason
    assert "empty file (0 bytes)" in problem_for(problems, tmp_path / "empty.jpg").reason
    assert "PDF" in problem_for(problems, tmp_path / "doc.pdf").reason


def test_subfolders_not_recursed_noted_only_with_images(tmp_path):
    good_folder(tmp_path)
    (tmp_path / "more").mkdir()
    noise(seed=7).save(tmp_path / "more" / "x.png")
    (tmp_path / "captions_backup").mkdir()
    (tmp_path / "captions_backup" / "a.txt").write_text("old")
    items, problems = scan(tmp_path)
    assert len(items) == 3
    (note,) = problems
    assert note.path == str(tmp_path / "more") and not note.fatal and "not scanned" in note.reason


def test_broken_symlink_is_fatal_not_a_crash(tmp_path):
    good_folder(tmp_path)
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    _, problems = scan(tmp_path)
    assert "broken link" in problem_for(problems, tmp_path / "gone.png").reason


# ---------- damaged and hostile files ----------

@pytest.mark.parametrize("fmt,name", [("PNG", "cut.png"), ("JPEG", "cut.jpg"), ("WEBP", "cut.webp")])
def test_truncated_file_is_fatal(tmp_path, fmt, name):
    data = encoded(noise(64, 64), fmt)
    (tmp_path / name).write_bytes(data[: len(data) * 2 // 3])
    _, problems = scan(tmp_path)
    p = problem_for(problems, tmp_path / name)
    assert p.fatal and p.reason.startswith("truncated ") and "ends early" in p.reason


def test_truncated_detected_even_if_another_library_allows_truncation(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encoded(noise(64, 64), "PNG")
    (tmp_path / "cut.png").write_bytes(data[:-200])
    _, problems = scan(tmp_path)
    assert problem_for(problems, tmp_path / "cut.png").reason.startswith("truncated PNG")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global is restored, not clobbered


@pytest.mark.parametrize("side", [9000, 30000])  # 81 MP: over our limit, under Pillow's; 900 MP: over both
def test_decompression_bomb_refused_without_decoding(tmp_path, monkeypatch, side):
    bomb = raw_png(side, side, 1, 0, bytes((side + 7) // 8))  # 1-bit grey, all black
    assert len(bomb) < 300_000
    (tmp_path / "bomb.png").write_bytes(bomb)
    noise(seed=60).save(tmp_path / "ok.png")  # decoded normally, which proves the spy sees decodes
    decoded_sizes = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        decoded_sizes.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    start = time.perf_counter()
    _, problems = scan(tmp_path)
    assert time.perf_counter() - start < 2.0
    p = problem_for(problems, tmp_path / "bomb.png")
    assert p.fatal and "too large" in p.reason and "downscale" in p.reason
    assert f"{side * side // 10**6} megapixels" in p.reason
    assert (RES, RES) in decoded_sizes and all(w * h <= MAX_PIXELS for w, h in decoded_sizes)


def test_heic_cannot_be_read_says_convert(tmp_path):
    # An ISO-BMFF 'ftyp' box with the HEIC brand, then junk: what an iPhone photo starts with.
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200))
    _, problems = scan(tmp_path)
    p = problem_for(problems, tmp_path / "IMG_0001.HEIC")
    assert p.fatal and "HEIC" in p.reason and "convert it to PNG or JPEG" in p.reason


def test_broken_avif_says_convert(tmp_path):
    (tmp_path / "x.avif").write_bytes(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(200))
    _, problems = scan(tmp_path)
    p = problem_for(problems, tmp_path / "x.avif")
    assert p.fatal and "AVIF" in p.reason and "convert it to PNG or JPEG" in p.reason


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow has no AVIF support")
def test_real_avif_is_used_when_pillow_reads_it(tmp_path):
    good_folder(tmp_path, 2)
    noise(seed=5).save(tmp_path / "photo.avif", quality=90)
    items, problems = scan(tmp_path)
    assert problems == [] and "photo.avif" in [i.path.name for i in items]


# ---------- modes, transparency, orientation ----------

def transparent_rgba() -> Image.Image:
    a = np.zeros((4, 4, 4), np.uint8)
    a[:, :2] = (255, 0, 0, 0)    # fully transparent (colour underneath must not show)
    a[:, 2:] = (255, 0, 0, 128)  # half-transparent red over white -> pink
    return Image.fromarray(a, "RGBA")


def palette_with_transparency() -> Image.Image:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (2, 0, 4, 4))
    img.info["transparency"] = 0  # index 0 (black) is transparent
    return img


def grey16() -> Image.Image:
    a = np.array([[0, 1000, 32896, 65535]] * 4, np.uint16)  # 32896 = 128 * 257
    return Image.fromarray(a)  # mode I;16


CASES = {  # name: (image, format, expected RGB at column 0, expected RGB at column 3, tolerance)
    "rgba": (transparent_rgba(), "PNG", (255, 255, 255), (255, 127, 127), 1),
    "la": (Image.merge("LA", [Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 0)]), "PNG",
           (255, 255, 255), (255, 255, 255), 0),
    "palette": (Image.new("RGB", (4, 4), (0, 0, 255)).convert("P"), "PNG", (0, 0, 255), (0, 0, 255), 0),
    "palette_transparent": (palette_with_transparency(), "PNG", (255, 255, 255), (0, 0, 255), 0),
    "grey": (Image.new("L", (4, 4), 77), "PNG", (77, 77, 77), (77, 77, 77), 0),
    "bilevel": (Image.new("1", (4, 4), 1), "PNG", (255, 255, 255), (255, 255, 255), 0),
    "grey16": (grey16(), "PNG", (0, 0, 0), (255, 255, 255), 0),
    "cmyk_jpeg": (Image.new("CMYK", (4, 4), (255, 0, 0, 0)), "JPEG", (0, 255, 255), (0, 255, 255), 3),
}


@pytest.mark.parametrize("name", CASES)
def test_every_mode_becomes_rgb_with_alpha_on_white(tmp_path, name):
    img, fmt, first, last, tol = CASES[name]
    path = tmp_path / f"{name}.{fmt.lower()}"
    img.save(path, fmt)
    out = load_image(path, 4)
    assert out.mode == "RGB" and out.size == (4, 4)
    a = np.asarray(out).astype(int)
    assert np.abs(a[0, 0] - first).max() <= tol and np.abs(a[0, 3] - last).max() <= tol


def test_16bit_grey_scaled_not_clipped(tmp_path):
    grey16().save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    row = np.asarray(load_image(tmp_path / "g.png", 4))[0, :, 0]
    assert row.tolist() == [0, 4, 128, 255]  # 1000/257 = 3.9; Pillow's convert('L') would give 0,255,255,255


def test_16bit_rgb_png_and_32bit_int_mode(tmp_path):
    (tmp_path / "rgb48.png").write_bytes(raw_png(4, 4, 16, 2, b"\x80\x80\x00\x00\xff\xff" * 4))
    assert np.asarray(load_image(tmp_path / "rgb48.png", 4))[0, 0].tolist() == [128, 0, 255]
    as_int = to_rgb(Image.fromarray(np.array([[0, 32896, 65535]], np.int32)))  # mode I holding 16-bit data
    assert np.asarray(as_int)[0, :, 0].tolist() == [0, 128, 255]


# Where the stored pixels come from for each EXIF orientation, from the EXIF 2.3 spec
# (numpy arrays are (rows, cols, 3); np.rot90 with k=1 turns counter-clockwise).
STORED_FROM_UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                        # mirrored left-right
    3: lambda a: np.rot90(a, 2),                    # upside down
    4: lambda a: a[::-1],                           # mirrored top-bottom
    5: lambda a: a.swapaxes(0, 1),                  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, 1),                    # viewer must turn it 90 degrees clockwise
    7: lambda a: np.rot90(a.swapaxes(0, 1), 2),     # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, -1),                   # viewer must turn it 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_gives_upright_pixels(tmp_path, orientation, fmt):
    upright = quadrants(16)
    stored = Image.fromarray(np.ascontiguousarray(STORED_FROM_UPRIGHT[orientation](upright)))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{fmt.lower()}"
    stored.save(path, fmt, exif=exif, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    got = np.asarray(load_image(path, 16)).astype(int)
    assert np.abs(got - upright).max() <= (0 if fmt == "PNG" else 12)


def test_exif_rotated_size_is_reported_upright(tmp_path):
    good_folder(tmp_path, 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    noise(2 * RES, RES, seed=50).save(tmp_path / "phone.jpg", exif=exif)  # stored landscape, shown portrait
    items, _ = scan(tmp_path)
    assert {i.path.name: i.size for i in items}["phone.jpg"] == (RES, 2 * RES)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_uses_first_frame_with_note(tmp_path, fmt):
    good_folder(tmp_path, 2)
    frames = [Image.new("RGB", (RES, RES), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    items, problems = scan(tmp_path)
    p = problem_for(problems, path)
    assert not p.fatal and p.reason == "animated: first frame used"
    assert {i.path.name: i.notes for i in items}[path.name] == ["animated: first frame used"]
    assert np.asarray(load_image(path, RES))[5, 5].tolist() == [255, 0, 0]


# ---------- sizes, duplicates, counts ----------

def test_size_rules(tmp_path):
    good_folder(tmp_path)
    noise(24, 40, seed=20).save(tmp_path / "small.png")     # shorter 24 < 32: upscaled, warning
    noise(15, 90, seed=21).save(tmp_path / "tiny.png")      # shorter 15 < 16: fatal
    noise(150, 32, seed=22).save(tmp_path / "banner.png")   # 150/32 = 4.7 > 4: warning
    items, problems = scan(tmp_path)
    small = problem_for(problems, tmp_path / "small.png")
    assert not small.fatal and "upscaled" in small.reason
    tiny = problem_for(problems, tmp_path / "tiny.png")
    assert tiny.fatal and "too small" in tiny.reason and "15x90" in tiny.reason
    banner = problem_for(problems, tmp_path / "banner.png")
    assert not banner.fatal and "aspect ratio" in banner.reason and "crop" in banner.reason
    assert sorted(i.path.name for i in items) == ["banner.png", "img000.png", "img001.png", "img002.png", "small.png"]


def test_duplicates_by_pixels_and_by_bytes(tmp_path):
    good_folder(tmp_path)
    img = noise(seed=30)
    img.save(tmp_path / "a.png", compress_level=1)
    img.save(tmp_path / "b.webp", lossless=True)                        # same pixels, other format
    (tmp_path / "c.png").write_bytes((tmp_path / "a.png").read_bytes())  # byte-identical copy
    items, problems = scan(tmp_path)
    assert "a.png" in [i.path.name for i in items]
    for later in ("b.webp", "c.png"):
        p = problem_for(problems, tmp_path / later)
        assert p.fatal and p.reason.startswith("duplicate of a.png")


def test_require_trainable_lists_every_fatal_problem(tmp_path):
    good_folder(tmp_path, 2)
    (tmp_path / "bad.png").write_text("nope")
    (tmp_path / "empty.png").write_bytes(b"")
    items, problems = scan(tmp_path)
    with pytest.raises(DatasetError) as err:
        require_trainable(items, problems, tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "only 2 usable" in msg and "at least 3" in msg
    assert str(tmp_path / "bad.png") in msg and str(tmp_path / "empty.png") in msg
    noise(seed=40).save(tmp_path / "third.png")
    require_trainable(*scan(tmp_path), tmp_path)  # 3 usable: no error


def test_missing_or_empty_folder(tmp_path):
    items, problems = scan(tmp_path / "nope")
    assert items == [] and problems[0].fatal and "does not exist" in problems[0].reason
    with pytest.raises(DatasetError, match="only 0 usable"):
        require_trainable(items, problems, tmp_path / "nope")
    with pytest.raises(DatasetError, match="Add more images"):
        require_trainable(*scan(tmp_path), tmp_path)


def test_more_than_200_images_warns(tmp_path):
    for i in range(201):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / f"{i:03d}.png")
    items, problems = scan(tmp_path, resolution=8)
    assert len(items) == 201
    (p,) = problems
    assert p.path == str(tmp_path) and not p.fatal and "201 images" in p.reason


# ---------- captions ----------

def test_caption_rules(tmp_path):
    cases = {  # file name: (caption file bytes or None, expected caption, source, note fragment or None)
        "missing": (None, "an image in sks style", "template", None),
        "empty": (b"  \n\t ", "an image in sks style", "template", "is empty"),
        "latin1": ("caf\u00e9 in sks style".encode("latin-1"), "an image in sks style", "template", "not UTF-8"),
        "notrigger": (b"a red fox", "sks, a red fox", "file", "trigger added"),
        "part_of_word": (b"sksy fox", "sks, sksy fox", "file", "trigger added"),
        "upper": (b"SKS fox", "SKS fox", "file", None),
        "multiline": (b"\xef\xbb\xbfsks,\n  red fox\r\n", "sks, red fox", "file", None),  # BOM + line breaks
    }
    for seed, (name, (data, *_)) in enumerate(cases.items()):
        noise(seed=seed).save(tmp_path / f"{name}.png")
        if data is not None:
            (tmp_path / f"{name}.txt").write_bytes(data)
    items, problems = scan(tmp_path)
    by_name = {i.path.stem: i for i in items}
    for name, (data, caption, source, note) in cases.items():
        item = by_name[name]
        assert (item.caption, item.caption_source) == (caption, source), name
        assert caption_for(item.path, "sks", "an image in {trigger} style") == (caption, source)
        assert (note is None) == (item.notes == []), (name, item.notes)
        if note:
            (p,) = [p for p in problems if note in p.reason and name in p.path]
            assert not p.fatal and p.path == str(tmp_path / f"{name}.txt")
            assert note in item.notes[0]
    assert "latin1.txt" in problem_for(problems, tmp_path / "latin1.txt").reason


class WordTokenizer:
    """Stands in for CLIPTokenizer: one id per word plus start and end tokens."""

    class Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text):
        return self.Out([0] + [1] * len(text.split()) + [2])


def test_long_caption_warns_where_it_is_cut(tmp_path):
    good_folder(tmp_path)
    words = ["sks"] + [f"w{i}" for i in range(2, 81)]  # 80 words -> 82 tokens
    (tmp_path / "img000.txt").write_text(" ".join(words))
    (tmp_path / "img001.txt").write_text(" ".join(words[:75]))  # 77 tokens: fits exactly
    items, problems = scan(tmp_path, tokenizer=WordTokenizer())
    (p,) = problems
    assert p.path == str(tmp_path / "img000.txt") and not p.fatal
    assert "82 tokens" in p.reason and "limit of 77" in p.reason and "'w76'" in p.reason
    assert items[0].notes == [p.reason] and items[1].notes == []
    assert scan(tmp_path)[1] == []  # no tokenizer: no token check


# ---------- tensors ----------

def test_load_image_resizes_shorter_side_and_center_crops(tmp_path):
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:200] = (0, 255, 0)
    a[:, 200:] = (0, 0, 255)
    Image.fromarray(a).save(tmp_path / "wide.png")
    out = np.asarray(load_image(tmp_path / "wide.png", 40)).astype(int)
    assert out.shape == (40, 40, 3)
    # Only the middle third survives the crop; Lanczos blends the outermost columns slightly.
    assert np.abs(out[:, 1:-1] - (0, 255, 0)).max() <= 2 and out[..., 1].min() >= 230


def test_to_tensor_shape_and_range():
    img = Image.new("RGB", (6, 4), (0, 255, 0))
    t = to_tensor(img)
    assert t.shape == (3, 4, 6) and t.dtype == torch.float32
    assert torch.equal(t[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))
    assert to_tensor(Image.new("L", (2, 2), 255)).shape == (3, 2, 2)


def test_load_image_on_bad_file_names_it(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ValueError, match="x.png: not an image"):
        load_image(tmp_path / "x.png", 8)


def test_dataset_side_files_are_not_judged_as_images(tmp_path):
    from PIL import Image as _Image
    for i in range(3):
        _Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "README.md").write_text("# my style\n", encoding="utf-8")
    (tmp_path / "sdlora.json").write_text('{"trigger": "x"}', encoding="utf-8")
    (tmp_path / "notes.png").write_text("a text file named like an image", encoding="utf-8")
    items, problems = scan_dataset(tmp_path, "x", resolution=64)
    assert len(items) == 3
    assert [Path(p.path).name for p in problems if p.fatal] == ["notes.png"]


@pytest.mark.parametrize("caption, expected", [
    ("zqx, a large red square", "a large red square"),
    ("an image in zqx style", "an image in style"),
    ("a ZQX photo, zqx, of a cat", "a photo, of a cat"),
    ("a red circle, zqx", "a red circle"),
    ("zqx", ""),
    ("zqxy, a zqx-like ring", "zqxy, a -like ring"),       # whole words only
])
def test_caption_without_trigger(caption, expected):
    from sdlora.data.captions import without_trigger
    assert without_trigger(caption, "zqx") == expected


def test_word_dropout_keeps_the_trigger_and_drops_about_p_of_the_rest():
    import random

    from sdlora.data.captions import caption_variants, drop_words
    caption = "zqx, a large red circle in the center on a gray background"
    rng = random.Random(0)
    dropped = [drop_words(caption, "zqx", 0.3, rng) for _ in range(400)]
    assert all(d.startswith("zqx") for d in dropped)
    kept = np.mean([len(d.split()) - 1 for d in dropped]) / (len(caption.split()) - 1)
    assert 0.65 < kept < 0.75, kept
    assert all(set(d.split()) <= set(caption.split()) for d in dropped)
    assert drop_words("a red circle, ZQX style", "zqx", 0.99, random.Random(1)) == "ZQX"
    out = caption_variants(["zqx, a red circle", "zqx, a blue star"], "zqx", 0.5, 4, seed=3)
    assert len(out) == 8 and out[0] == "zqx, a red circle" and out[4] == "zqx, a blue star"
    assert out == caption_variants(["zqx, a red circle", "zqx, a blue star"], "zqx", 0.5, 4, seed=3)
    assert len(set(out[:4])) > 1 and all("red" not in v for v in out[4:])
