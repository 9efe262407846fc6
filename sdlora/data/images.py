"""Decoding one image file safely, and turning it into a training tensor.

`decode()` is the single gate every file passes before training: it judges a
file by its bytes (not its extension), refuses decompression bombs from the
header alone, forces a full decode so truncated files fail now rather than
mid-run, applies EXIF orientation and converts every mode to RGB with
transparency composited on white. It raises `ImageError` with a
plain-language reason; it never lets a decoder exception escape.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from sdlora.data.buckets import cover

# Refuse anything larger before decoding it: 64 MP is an 8000x8000 photo, far
# above any training resolution, and 64 MP of RGBA is already 256 MB of memory.
# (Pillow's own guard, Image.MAX_IMAGE_PIXELS, only warns at ~89 MP.)
MAX_PIXELS = 64_000_000

# ISO-BMFF brands (bytes 8..12 after "ftyp") of formats Pillow may lack a reader for.
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis"}
_VIDEO_BRANDS = {b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4", b"3gp5"}
_CONVERT = "convert it to PNG or JPEG (e.g. export from Photos/Preview) or remove it"


class ImageError(ValueError):
    """A file cannot be used as a training image; `reason` says why and what to do."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Decoded:
    """A fully decoded, upright RGB image and what was noticed on the way."""
    image: Image.Image               # mode RGB, full size, EXIF orientation applied
    fmt: str                         # Pillow's format name, e.g. "PNG"
    notes: list[str] = field(default_factory=list)  # non-fatal remarks, e.g. "animated: first frame used"


def sniff(head: bytes) -> str:
    """Name the kind of file from its first bytes ('' when unknown); used only for messages."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return "HEIC"
        if brand in _AVIF_BRANDS:
            return "AVIF"
        if brand in _VIDEO_BRANDS:
            return "video"
    if head.startswith(b"%PDF"):
        return "PDF"
    if head.startswith(b"PK\x03\x04"):
        return "ZIP"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            return ""
        return "SVG" if "<svg" in text.lower() else "text"
    return ""


def _not_an_image(kind: str) -> str:
    """The reason for a file that no image reader recognises."""
    if kind in ("HEIC", "AVIF"):
        return f"{kind} image, which this installation cannot read: {_CONVERT}"
    if kind == "SVG":
        return "SVG (vector) image, which cannot be trained on directly: export it as PNG and remove the SVG"
    if kind:
        described = {"text": "a text file", "video": "a video", "PDF": "a PDF document", "ZIP": "a ZIP archive"}
        if kind in described:
            return f"not an image (the content is {described[kind]}): remove it or move it out of the folder"
        return f"damaged {kind} file (its header cannot be read): re-export it or remove it"
    return "not an image in any format that can be read: remove it or move it out of the folder"


def _decode_failure(kind: str, head: bytes, size: int, err: Exception) -> str:
    """Turn a decoder exception into a reason, telling truncation apart from other damage."""
    msg = str(err)
    riff_short = kind == "WebP" and int.from_bytes(head[4:8], "little") + 8 > size
    if "truncat" in msg.lower() or isinstance(err, EOFError) or riff_short:
        return f"truncated {kind or 'image'} (the file ends early): re-export or remove it"
    if kind in ("HEIC", "AVIF"):
        return f"{kind} image that could not be decoded ({msg}): {_CONVERT}"
    return f"damaged {kind or 'image'} file ({type(err).__name__}: {msg}): re-export or remove it"


@contextlib.contextmanager
def _strict_decoding() -> Iterator[None]:
    """Make truncation an error and the decompression-bomb warning an exception, for this block only.

    LOAD_TRUNCATED_IMAGES is a Pillow module global another library may have set
    to True, which would silently pad a cut-off file with grey.
    """
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": judged by the outcome instead
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def _bomb_reason(width: int, height: int) -> str:
    return (f"too large to decode safely ({width}x{height} = {width * height / 1e6:.0f} megapixels; "
            f"the limit is {MAX_PIXELS // 1_000_000}): downscale it first")


def decode(path: Path | str) -> Decoded:
    """Open, check and fully decode one file; raise ImageError naming the reason."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ImageError(path, f"cannot be read ({e.strerror or e}): check its permissions") from None
    if size == 0:
        raise ImageError(path, "empty file (0 bytes): remove it")
    kind = sniff(head)
    try:
        with _strict_decoding(), Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:  # from the header: nothing has been decoded yet
                raise ImageError(path, _bomb_reason(width, height))
            if width < 1 or height < 1:
                raise ImageError(path, f"has no pixels ({width}x{height}): remove it")
            animated = bool(getattr(img, "is_animated", False))
            img.seek(0)
            img.load()  # full decode: a truncated or corrupt file fails here, not mid-training
            fmt = img.format or kind
            rgb = to_rgb(_upright(img))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # Pillow's guard, from the header
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(pixels.group(1)) / 1e6:.0f} megapixels" if pixels else "over Pillow's limit"
        raise ImageError(path, f"too large to decode safely ({declared}; the limit is {MAX_PIXELS // 1_000_000}): "
                         "downscale it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, _not_an_image(kind)) from None
    except MemoryError:
        raise ImageError(path, "needs more memory to decode than is available: downscale it") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on hostile bytes; all mean "damaged"
        raise ImageError(path, _decode_failure(kind, head, size, e)) from None
    notes = ["animated: first frame used"] if animated else []
    return Decoded(rgb, fmt, notes)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag (values 1-8), so phone photos are not trained sideways."""
    return ImageOps.exif_transpose(img)


def _scale_wide(img: Image.Image) -> Image.Image:
    """16-bit or float single-channel images to 8-bit 'L', scaling instead of clipping.

    Pillow's own convert('L') clips I;16 values above 255 to white, so a
    16-bit grayscale PNG would come out nearly all white.
    """
    a = np.asarray(img)
    if img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        a = a * 255.0 if a.size and a.max() <= 1.0 else a  # floats in 0..1 or already 0..255
    elif img.mode.startswith("I;16") or (a.size and a.max() > 255):
        a = a.astype(np.float64) / 257.0  # 65535 / 257 = 255 exactly
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency (alpha channel or tRNS/palette key) composited on white."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _scale_wide(img)
    if img.mode == "1":
        img = img.convert("L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if not has_alpha:
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def fit_bucket(img: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Resize (Lanczos) just enough to cover the (width, height) bucket, then center-crop to it."""
    (nw, nh), (left, top) = cover(img.size, bucket)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img.crop((left, top, left + bucket[0], top + bucket[1]))


def load_image(path: Path | str, resolution: int, bucket: tuple[int, int] | None = None) -> Image.Image:
    """The training view of one file: RGB, upright, white behind transparency, fitted to its bucket
    (width, height), or to resolution x resolution."""
    return fit_bucket(decode(path).image, bucket or (resolution, resolution))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as float32 [3, H, W] in [-1, 1] (the VAE's input range)."""
    if img.mode != "RGB":
        img = to_rgb(img)
    a = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3), a copy so torch owns it
    return a.permute(2, 0, 1).float() / 127.5 - 1.0


def pixel_digest(img: Image.Image) -> str:
    """A hash of the decoded pixels, so the same picture saved twice (or under two names) matches."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}{img.size}".encode())
    h.update(img.tobytes())
    return h.hexdigest()
