"""Captions: which caption each image trains with, and the one helper for the trigger word in it.

Every front end and the trainer ask here whether a text holds the trigger (`has_trigger`), put it in
front of a caption that lacks it, or take it out (`without_trigger`); the rule is the same
everywhere: a whole word, case-insensitive (the CLIP tokenizer lowercases).
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from sdlora.data.problems import DatasetError, Problem


def caption_file(path: Path) -> Path | None:
    for suffix in (".txt", ".TXT", ".Txt"):
        candidate = path.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def has_trigger(text: str, word: str) -> bool:
    """Whether `word` is in `text` as a word of its own."""
    # Case-insensitive: the CLIP tokenizer lowercases, so "SKS" and "sks" are the same tokens.
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def without_trigger(caption: str, trigger: str) -> str:
    """The caption with the trigger word taken out: 'sks, a red circle' -> 'a red circle'."""
    text = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", " ", caption, flags=re.IGNORECASE)
    text = re.sub(r"\s+([,.;:])", r"\1", " ".join(text.split()))     # no space before punctuation
    text = re.sub(r"([,;:])(\s*[,;:])+", r"\1", text)                # 'a, , b' -> 'a, b'
    return text.strip(" ,;:")


def drop_words(caption: str, trigger: str, p: float, rng: random.Random) -> str:
    """The caption with each word other than the trigger left out with probability p
    ('sks, a large red circle' -> 'sks, large circle'): the trigger is the one word all variants share."""
    words = caption.split()
    kept = [w for w in words if re.sub(r"\W", "", w).lower() == trigger.lower() or rng.random() >= p]
    return " ".join(kept).strip(" ,;:")


def shuffle_tags(caption: str, trigger: str, keep: int, rng: random.Random) -> str:
    """The caption's comma-separated tags in a shuffled order, the first `keep` and any holding the trigger left
    where they are ('sks, watercolor, a cat, soft light' -> 'sks, soft light, a cat, watercolor'), as kohya's
    shuffle_caption with keep_tokens."""
    tags = [s.strip() for s in caption.split(",") if s.strip()]
    fixed = {i for i, tag in enumerate(tags) if i < keep or has_trigger(tag, trigger)}
    free = [i for i in range(len(tags)) if i not in fixed]
    order = free[:]
    rng.shuffle(order)
    out = list(tags)
    for i, j in zip(free, order):
        out[i] = tags[j]
    return ", ".join(out)


def caption_variants(captions: list[str], trigger: str, p: float, n: int, seed: int, shuffle: bool = False,
                     keep: int = 0) -> list[str]:
    """n variants of each caption, image by image: the caption itself first, then n - 1 with its tags shuffled
    (`shuffle`, the first `keep` in place) and then words dropped with probability p."""
    rng = random.Random(seed)

    def variant(c: str) -> str:
        c = shuffle_tags(c, trigger, keep, rng) if shuffle else c
        return drop_words(c, trigger, p, rng) if p else c
    return [v for c in captions for v in [c] + [variant(c) for _ in range(n - 1)]]


def read_caption(path: Path, trigger: str, template: str) -> tuple[str, str, list[Problem]]:
    """(caption, source, warnings); warnings name the caption file when that is what to edit."""
    fallback = template.replace("{trigger}", trigger)
    txt = caption_file(Path(path))
    warn: list[Problem] = []
    if txt is None:
        caption, source = fallback, "template"
    else:
        try:
            raw = txt.read_bytes().decode("utf-8-sig")  # -sig: editors on Windows prepend a BOM
        except UnicodeDecodeError:
            raw = ""
            warn.append(Problem(str(txt), f"caption file {txt.name} is not UTF-8 text: the template caption "
                                "is used instead; re-save it as UTF-8", False))
        except OSError as e:
            raw = ""
            warn.append(Problem(str(txt), f"caption file {txt.name} cannot be read ({e.strerror or e}): "
                                "the template caption is used instead", False))
        # Line breaks and runs of spaces mean nothing to the text encoder; one line shows what trains.
        caption, source = " ".join(raw.split()), "file"
        if not caption:
            caption, source = fallback, "template"
            if not warn:
                warn.append(Problem(str(txt), f"caption file {txt.name} is empty: the template caption is used", False))
    if not has_trigger(caption, trigger):
        caption = f"{trigger}, {caption}"
        where = str(txt) if source == "file" and txt else str(path)
        warn.append(Problem(where, f"trigger added: '{trigger}' was not in the caption, so it was put in front", False))
    return caption, source, warn


def caption_for(path: Path | str, trigger: str, template: str) -> tuple[str, str]:
    """The exact caption an image trains with and its source, "file" or "template"."""
    caption, source, _ = read_caption(Path(path), trigger, template)
    return caption, source


def folder_defaults(folder: str | Path) -> dict[str, str]:
    """Settings a dataset folder carries in ``sdlora.json`` (``trigger``, ``template``); {} if none.

    The CLI and the web UI use them when the user gives no trigger, so
    ``sdlora train --data datasets/neon`` trains with the dataset's own trigger word.
    """
    path = Path(folder) / "sdlora.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path} is not valid JSON ({e}); fix it or delete it") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path} must hold a JSON object like {{\"trigger\": \"mystyle\"}}")
    known = {"trigger", "template"}
    return {k: str(v) for k, v in raw.items() if k in known and isinstance(v, str) and v.strip()}


def readme_trigger(folder: str | Path) -> str:
    """A trigger named in a dataset's README ('trigger word: neonstyle'), or ''."""
    for readme in (Path(folder) / "README.md", Path(folder) / "README.txt"):
        if readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            m = re.search(r"trigger(?:\s+word)?\s*[:=][\s`*'\":]*([\w-]+)", text, re.IGNORECASE)
            if m:
                return m.group(1)
    return ""


__all__ = ["has_trigger", "without_trigger", "drop_words", "shuffle_tags", "caption_variants", "caption_for",
           "folder_defaults", "readme_trigger"]
