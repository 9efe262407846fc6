"""Automatic captions: a `.txt` caption, written by an image-captioning model, for every image that has none.

`caption_folder()` walks a dataset folder with the scan's own rule for which files are images
(`scan._candidates` then `images.decode`, as training does), so side files (`.txt`, `.json`, `.md`),
hidden files and non-images are never captioned. Existing captions are kept byte for byte unless
`overwrite=True`. The model is any transformers image-to-text model (BLIP, GIT, ViT-GPT2
VisionEncoderDecoder, Florence-2, ...), given as a hub id or a local folder; `load_captioner()` loads
it with `AutoModelForImageTextToText` + its processor (transformers 5 has no "image-to-text"
pipeline) and turns every way loading can fail into one `CaptionError` line naming the value.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sdlora.data.captions import caption_file
from sdlora.data.images import ImageError, decode
from sdlora.data.scan import _candidates
from sdlora.safefiles import atomic_write_bytes

# Models that caption only when told the task in their prompt; the others caption from pixels alone.
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}
# Tokens generated when no max_length is given: CLIP reads 77 tokens, so a longer caption is cut in training.
DEFAULT_MAX_TOKENS = 60
EXAMPLE_MODEL = "Salesforce/blip-image-captioning-base"


class CaptionError(ValueError):
    """The folder or the captioning model cannot be used; the message names it and says what to do."""


@dataclass
class CaptionResult:
    """What happened to one file: written, kept (it had a caption), failed or skipped (not an image)."""
    path: Path
    status: str
    caption: str = ""            # the caption written, or the one kept
    reason: str = ""             # why it failed or was skipped

    def line(self) -> str:
        return f"{self.path.name}: {self.status}: {self.caption if self.status in ('written', 'kept') else self.reason}"


@dataclass
class CaptionReport:
    folder: Path
    model: str
    results: list[CaptionResult] = field(default_factory=list)

    def of(self, status: str) -> list[CaptionResult]:
        return [r for r in self.results if r.status == status]

    def summary(self) -> str:
        counts = [f"{len(self.of(s))} {s}" for s in ("written", "kept", "failed", "skipped")]
        return f"{self.folder}: {', '.join(counts)} (model {self.model})"


class Captioner:
    """A loaded captioning model: `captioner(image, max_words)` gives one line of text."""

    def __init__(self, name: str, model, processor, image_processor, tokenizer, device: str):
        self.name, self.model, self.device = name, model, device
        self.processor, self.image_processor, self.tokenizer = processor, image_processor, tokenizer
        self.prompt = TASK_PROMPTS.get(getattr(model.config, "model_type", ""))

    def __call__(self, image, max_words: int | None = None) -> str:
        import torch
        if self.prompt:
            inputs = self.processor(text=self.prompt, images=image, return_tensors="pt")
        else:
            inputs = self.image_processor(images=image, return_tensors="pt")
        # pixel values in the model's own dtype (a checkpoint may be float16); token ids stay integers
        inputs = {k: v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        # a word is at least one token; 3 tokens a word leaves room to end the last word whole
        budget = DEFAULT_MAX_TOKENS if max_words is None else 3 * max_words
        with torch.no_grad():
            ids = self.model.generate(**inputs, max_new_tokens=budget)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and ids.shape[1] >= prompt_ids.shape[1] and \
                torch.equal(ids[:, :prompt_ids.shape[1]], prompt_ids):
            ids = ids[:, prompt_ids.shape[1]:]          # decoder-only models echo their prompt
        text = self.tokenizer.batch_decode(ids, skip_special_tokens=True)[0]
        return clean_caption(text, max_words)


def clean_caption(text: str, max_words: int | None = None) -> str:
    """One line, single spaces, at most max_words words, no dangling punctuation at the cut."""
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    return " ".join(words).strip(" ,;:")


def join_caption(caption: str, prefix: str = "", suffix: str = "") -> str:
    """'mystyle' + 'a red circle' + 'outline' -> 'mystyle, a red circle, outline'."""
    return ", ".join(p for p in (" ".join(prefix.split()), caption, " ".join(suffix.split())) if p)


def _source(model: str) -> str | Path:
    """A local model folder (checked), or the value as a hub id; a path that is not there is an error now."""
    text = str(model or "").strip()
    if not text:
        raise CaptionError(f"no captioning model given: pass a hub id (e.g. {EXAMPLE_MODEL}) or a local folder of one")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CaptionError(f"captioning model {text} is a file, not a model folder: pass the folder that holds "
                               "its config.json")
        if not (path / "config.json").is_file():
            raise CaptionError(f"captioning model folder {text} is not a model (it has no config.json): pass the "
                               "folder that save_pretrained or a hub download wrote")
        return path
    # A hub id is 'name' or 'owner/name'; anything else was meant as a folder that is not there.
    if text.startswith((".", "/", "~", "\\")) or "\\" in text or text.count("/") > 1 or re.match(r"^\w:", text):
        raise CaptionError(f"captioning model folder {text} does not exist: check the path, or pass a hub id")
    return text


def _offline() -> bool:
    import os

    import huggingface_hub
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or huggingface_hub.is_offline_mode()


@contextlib.contextmanager
def _quiet():
    """No backend notices from transformers while loading (e.g. 'requires torchvision ... falling back'): they
    are not the user's to act on. Download progress bars stay: a first download can take minutes."""
    from transformers.utils import logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_model(src: str | Path, name: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
    try:
        config = AutoConfig.from_pretrained(src)
    except OSError as e:
        if isinstance(src, Path):
            raise CaptionError(f"captioning model folder {name} cannot be read: {_first_line(e)}") from None
        why = "offline mode is on: HF_HUB_OFFLINE is set" if _offline() else _first_line(e)
        raise CaptionError(f"could not fetch the captioning model '{name}' from the Hugging Face hub ({why}): "
                           "pass a local folder of the model instead") from None
    except ValueError as e:   # no model_type, or a model that needs its own code (trust_remote_code)
        raise CaptionError(f"captioning model {name} cannot be loaded: {_first_line(e)}") from None
    if type(config) not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING:
        raise CaptionError(f"{name} is a '{config.model_type}' model, which does not caption images: pass an "
                           f"image-to-text model (BLIP, GIT, ViT-GPT2, Florence-2), e.g. {EXAMPLE_MODEL}")
    # float32 on CPU: half-precision checkpoints are slow or unsupported there
    dtype = torch.float32 if str(device).startswith("cpu") else "auto"
    try:
        return AutoModelForImageTextToText.from_pretrained(src, dtype=dtype).to(device).eval()
    except (OSError, ValueError, RuntimeError) as e:   # RuntimeError: also out of memory on `device`
        raise CaptionError(f"captioning model {name} cannot be loaded on {device}: {_first_line(e)}") from None


def _load_processors(src: str | Path, name: str):
    """(processor, image processor, tokenizer): a captioning model may ship one processor or the two parts."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    try:
        proc = AutoProcessor.from_pretrained(src)
        # ViT-GPT2 ships no processor class: AutoProcessor gives its tokenizer alone
        image = getattr(proc, "image_processor", None) or (proc if hasattr(proc, "preprocess") else None) \
            or AutoImageProcessor.from_pretrained(src)
        tokenizer = getattr(proc, "tokenizer", None) or (proc if hasattr(proc, "batch_decode") else None) \
            or AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError, TypeError) as e:
        raise CaptionError(f"captioning model {name} has no usable image processor and tokenizer "
                           f"({_first_line(e)}): its folder needs preprocessor_config.json and the tokenizer "
                           "files") from None
    return proc, image, tokenizer


def load_captioner(model: str | Path, device: str = "cpu") -> Captioner:
    """Load a transformers image-to-text model and its processor; every failure is one CaptionError line."""
    name = str(model).strip()
    src = _source(name)
    with _quiet():
        loaded = _load_model(src, name, device)
        proc, image, tokenizer = _load_processors(src, name)
    chat = getattr(proc, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if chat and loaded.config.model_type not in TASK_PROMPTS:
        # chat models (LLaVA, Qwen-VL, ...) answer a conversation; from pixels alone they write no caption
        raise CaptionError(f"{name} is a chat vision-language model, which needs a conversation to answer: pass "
                           f"an image-captioning model (BLIP, GIT, ViT-GPT2, Florence-2), e.g. {EXAMPLE_MODEL}")
    return Captioner(name, loaded, proc, image, tokenizer, device)


def _caption_one(path: Path, image, captioner: Captioner, target: Path, prefix: str, suffix: str,
                 max_length: int | None) -> CaptionResult:
    try:
        text = captioner(image, max_length)
    except Exception as e:  # noqa: BLE001 - one image the model chokes on must not lose the others' captions
        return CaptionResult(path, "failed", reason=f"the model failed on it: {_first_line(e)}")
    if not text:
        return CaptionResult(path, "failed", reason="the model gave an empty caption; write one by hand")
    caption = join_caption(text, prefix, suffix)
    try:
        atomic_write_bytes(target, caption.encode("utf-8"))
    except (OSError, ValueError) as e:
        return CaptionResult(path, "failed", reason=str(e))
    return CaptionResult(path, "written", caption)


def _existing(path: Path) -> tuple[Path | None, str | None]:
    """(its caption file, that file's text) or (None, None); a blank caption file counts as none."""
    txt = caption_file(path)
    if txt is None:
        return None, None
    try:
        text = " ".join(txt.read_bytes().decode("utf-8-sig").split())
    except (OSError, UnicodeDecodeError):
        return txt, "(caption file not readable as UTF-8 text; kept as it is)"
    return txt, (text or None)


def caption_folder(folder: str | Path, model: str | Path | Captioner, *, overwrite: bool = False, prefix: str = "",
                   suffix: str = "", max_length: int | None = None, device: str = "cpu",
                   on_progress: Callable[[int, int, CaptionResult], None] | None = None) -> CaptionReport:
    """Caption every image in `folder` (not sub-folders) that has no caption file; returns what happened to each.

    Files training would skip are reported as skipped with the scan's reason. A caption is the model's text cut
    to `max_length` words, with `prefix` before and `suffix` after it (joined with ", "), written atomically
    as `<image>.txt`, UTF-8, one line. The model is loaded only when some image needs a caption.
    """
    folder = Path(folder)
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise CaptionError(f"max_length={max_length!r}: give a whole number of words, 1 or more")
    if not folder.is_dir():
        raise CaptionError(f"{folder}: folder does not exist or is not a folder: check the path")
    try:
        files, problems = _candidates(folder)
    except OSError as e:
        raise CaptionError(f"{folder}: folder cannot be read ({e.strerror or e}): check its permissions") from None
    if not isinstance(model, Captioner):
        _source(str(model))             # a folder that is not there fails now, even with nothing to caption
    report = CaptionReport(folder, model.name if isinstance(model, Captioner) else str(model).strip())
    total = len(problems) + len(files)
    claimed: dict[Path, Path] = {}     # caption file -> image captioned into it by this run ('a.png', 'a.jpg')
    for p in problems:                 # broken links, pipes, sub-folders with images: as the scan reports them
        _add(report, CaptionResult(Path(p.path), "skipped", reason=p.reason), total, on_progress)
    for path in files:
        result, model = _one_file(path, model, overwrite, prefix, suffix, max_length, device, claimed)
        _add(report, result, total, on_progress)
    return report


def _add(report: CaptionReport, result: CaptionResult, total: int, on_progress) -> None:
    report.results.append(result)
    if on_progress is not None:
        on_progress(len(report.results), total, result)


def _one_file(path: Path, model, overwrite: bool, prefix: str, suffix: str, max_length: int | None, device: str,
              claimed: dict[Path, Path]) -> tuple[CaptionResult, str | Path | Captioner]:
    """One candidate file's result, and the model (loaded on first need, then reused)."""
    try:
        image = decode(path).image      # the same gate training uses: judged by its bytes, EXIF applied
    except ImageError as e:
        return CaptionResult(path, "skipped", reason=e.reason), model
    txt, existing = _existing(path)
    target = txt or path.with_suffix(".txt")
    if target in claimed:
        return CaptionResult(path, "kept", existing or "", f"shares {target.name} with {claimed[target].name}"), model
    if existing is not None and not overwrite:
        return CaptionResult(path, "kept", existing), model
    if not isinstance(model, Captioner):
        model = load_captioner(model, device)
    result = _caption_one(path, image, model, target, prefix, suffix, max_length)
    if result.status == "written":
        claimed[target] = path
    return result, model


__all__ = ["CaptionError", "CaptionReport", "CaptionResult", "Captioner", "caption_folder", "load_captioner",
           "clean_caption", "join_caption", "EXAMPLE_MODEL"]
