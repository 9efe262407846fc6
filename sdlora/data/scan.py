"""Scanning a training folder: which images train, with which caption, and what is wrong.

`scan_dataset()` checks every file before any model is loaded and returns the
usable `Item`s (each with the exact caption it trains with) and every `Problem`
found, each naming its file and what to do. `require_trainable()` turns "too
few usable images" into one `DatasetError` listing all fatal problems. Image
decoding lives in `images.py`; `load_image` and `to_tensor` are re-exported here.
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdlora.data.captions import read_caption, caption_file, caption_for, folder_defaults, without_trigger
from sdlora.data.images import ImageError, decode, load_image, pixel_digest, sniff, to_tensor
from sdlora.data.problems import DatasetError, Problem

MIN_IMAGES = 3     # fewer cannot express a style; the LoRA would memorise them
MANY_IMAGES = 200  # above this a style LoRA gains little and each epoch gets long
MAX_ASPECT = 4.0   # long/short side; beyond it the square crop keeps under a quarter of the image
# Files operating systems drop into folders; never images, never worth a warning.
_OS_JUNK = {"thumbs.db", "desktop.ini"}
_IMAGE_KINDS = {"PNG", "JPEG", "GIF", "WebP", "TIFF", "BMP", "HEIC", "AVIF"}
# Side files a dataset folder may carry: captions (read with their image), its own settings
# (sdlora.json) and notes. A file with one of these suffixes is never judged as an image.
_SIDE_FILES = {".txt", ".md", ".json"}


@dataclass
class Item:
    path: Path
    caption: str                 # the exact caption this image trains with (trigger included)
    caption_source: str          # "file" (from the .txt) or "template"
    size: tuple[int, int]        # (width, height) after EXIF orientation
    notes: list[str] = field(default_factory=list)  # per-image warnings (also present in problems)


def _token_warning(caption: str, tokenizer: Any, max_tokens: int) -> str | None:
    """If the caption exceeds the text encoder's window, name the word where the cut falls."""
    count = len(tokenizer(caption).input_ids)  # includes the start and end tokens
    if count <= max_tokens:
        return None
    words = caption.split(" ")
    lo, hi = 1, len(words)  # find the shortest word prefix that no longer fits
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer(" ".join(words[:mid])).input_ids) > max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return (f"caption is {count} tokens, over the text encoder's limit of {max_tokens}: "
            f"it is cut at '{words[lo - 1]}' (word {lo}) and the rest is ignored; shorten it")


def _size_checks(path: Path, size: tuple[int, int], resolution: int) -> list[Problem]:
    w, h = size
    short, long = min(w, h), max(w, h)
    found = []
    if short < resolution / 2:
        return [Problem(str(path), f"too small: {w}x{h}, the shorter side is under half of the {resolution}px "
                        "training size and would be upscaled into a blur; use a larger original", True)]
    if short < resolution:
        found.append(Problem(str(path), f"small: {w}x{h} will be upscaled to {resolution}px and may look soft", False))
    if long / short > MAX_ASPECT:
        found.append(Problem(str(path), f"extreme aspect ratio {w}x{h}: the square center crop loses most of "
                             "the image; crop it to the part that matters", False))
    return found


def _subfolder_note(folder: Path) -> Problem | None:
    """A sub-folder is not scanned; say so only if it holds images, or the note is noise."""
    try:
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.name.startswith(".") and _looks_like_image(f):
                return Problem(str(folder), f"sub-folder '{folder.name}' holds images but is not scanned: "
                               "move them into the main folder to train on them", False)
    except OSError:
        return None
    return None


def _looks_like_image(path: Path) -> bool:
    with path.open("rb") as f:
        return sniff(f.read(64)) in _IMAGE_KINDS


def _candidates(folder: Path) -> tuple[list[Path], list[Problem]]:
    """Files to judge as images, in sorted order, and problems with the folder's other entries."""
    files, problems = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(".") or entry.name.lower() in _OS_JUNK:
            continue
        if entry.suffix.lower() in _SIDE_FILES:
            continue
        try:
            mode = entry.stat().st_mode
        except OSError:
            problems.append(Problem(str(entry), "broken link (it points to a missing file): remove it", True))
            continue
        if stat.S_ISDIR(mode):
            note = _subfolder_note(entry)
            if note:
                problems.append(note)
        elif stat.S_ISREG(mode):
            files.append(entry)
        else:  # a pipe or device; reading it could block forever
            problems.append(Problem(str(entry), "not a regular file: remove it from the folder", True))
    return files, problems


def scan_dataset(folder: Path | str, trigger: str, template: str = "an image in {trigger} style",
                 resolution: int = 512, tokenizer: Any = None,
                 max_tokens: int = 77) -> tuple[list[Item], list[Problem]]:
    """Check every file in `folder` (not sub-folders); return usable items and all problems found.

    Never raises for a bad file: each one becomes a fatal Problem and is skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [], [Problem(str(folder), "folder does not exist or is not a folder: check the path", True)]
    try:
        files, problems = _candidates(folder)
    except OSError as e:  # e.g. no permission to list the folder
        return [], [Problem(str(folder), f"folder cannot be read ({e.strerror or e}): check its permissions", True)]
    items: list[Item] = []
    seen: dict[str, Path] = {}  # pixel digest -> first file with those pixels
    for path in files:
        try:
            decoded = decode(path)
        except ImageError as e:
            problems.append(Problem(str(path), e.reason, True))
            continue
        digest = pixel_digest(decoded.image)
        if digest in seen:
            problems.append(Problem(str(path), f"duplicate of {seen[digest].name} (same pixels): "
                                    "only the first is used; remove one of them", True))
            continue
        seen[digest] = path
        found = [Problem(str(path), n, False) for n in decoded.notes]
        found += _size_checks(path, decoded.image.size, resolution)
        if any(p.fatal for p in found):
            problems += [p for p in found if p.fatal]
            continue
        caption, source, warn = read_caption(path, trigger, template)
        found += warn
        if tokenizer is not None:
            msg = _token_warning(caption, tokenizer, max_tokens)
            if msg:
                found.append(Problem(str(caption_file(path) or path), msg, False))
        problems += found
        items.append(Item(path, caption, source, decoded.image.size, [p.reason for p in found]))
    if len(items) > MANY_IMAGES:
        problems.append(Problem(str(folder), f"{len(items)} images: over {MANY_IMAGES} rarely helps a style LoRA "
                                "and makes training slow; consider keeping the best ones", False))
    return items, problems


def require_trainable(items: list[Item], problems: list[Problem], folder: Path | str,
                      show: Callable[[str], str] = str) -> None:
    """Raise DatasetError listing every fatal problem if fewer than MIN_IMAGES images are usable; `show` turns
    a problem's path into what the message names (the web UI names files, not its server folders)."""
    if len(items) >= MIN_IMAGES:
        return
    lines = [f"{folder}: only {len(items)} usable image(s); at least {MIN_IMAGES} are needed to train a style."]
    fatal = [p for p in problems if p.fatal]
    if fatal:
        lines.append(f"{len(fatal)} file(s) could not be used:")
        lines += [f"  - {show(p.path)}: {p.reason}" for p in fatal]
    else:
        lines.append("Add more images (PNG, JPEG or WebP) to the folder.")
    raise DatasetError("\n".join(lines))


__all__ = ["DatasetError", "Problem", "Item", "scan_dataset", "require_trainable",
           "load_image", "to_tensor", "caption_for", "folder_defaults", "without_trigger"]
