"""Atomic writes and validating reads of LoRA files.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of
JSON header ({name: {"dtype", "shape", "data_offsets": [begin, end]}} plus an
optional "__metadata__" of str -> str), then the tensor bytes, with offsets
relative to the end of the header (format: huggingface/safetensors README).
``read_lora_file`` checks all of that before any tensor is loaded, so a
damaged or hostile file fails with a ``LoraFileError`` naming the file and key.

Pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run code when
unpickled; they are refused unless asked for, and then loaded only with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Float dtypes a LoRA holds, with their byte sizes (safetensors dtype names).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_CHUNK = 1 << 20


class LoraFileError(ValueError):
    """A LoRA file is missing, unsafe or malformed; the message names the file and what to do."""


def _write_all(fh, data: bytes) -> None:
    """Write ``data`` in 1 MiB chunks (a seam for tests that fail half-way)."""
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        fh.write(view[start:start + _CHUNK])


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            _write_all(fh, data)
    atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Make ``path`` by ``write(temp path)``, so that readers see the old file or the whole new one, never a part.

    The temp file is in the same folder; once written it is fsynced and ``os.replace``d over ``path``
    (atomic on POSIX and Windows). On any error it is removed, and an OS error names the file and what to
    do. Large files (a merged checkpoint) are written by ``write`` straight to disk, never held as bytes.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise LoraFileError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "r+b") as fh:
            os.fsync(fh.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, 0o644)          # mkstemp makes 0600; other tools (A1111, ComfyUI) must read it
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        advice = {errno.ENOSPC: "free disk space or choose another output folder",
                  errno.EDQUOT: "free disk space or choose another output folder",
                  errno.EACCES: "make the folder writable or choose another output folder",
                  errno.EROFS: "choose an output folder on a writable disk"}.get(e.errno, "check the folder")
        raise OSError(e.errno, f"could not write {path}: {e.strerror or e}; {advice}", str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_lora_file(path: str | os.PathLike, sd: dict[str, torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    """Save tensors + string metadata as ``.safetensors``, atomically; refuses NaN/Inf and non-str metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise LoraFileError(f"{path}: LoRA files are saved as .safetensors; use a name ending in .safetensors")
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LoraFileError(f"{path}: metadata {key!r} has a {type(value).__name__} value; "
                                "safetensors metadata values must be str (json.dumps dicts, str() numbers)")
    tensors = {}
    for key, t in sd.items():
        if not isinstance(t, torch.Tensor):
            raise LoraFileError(f"{path}: {key!r} is a {type(t).__name__}, not a tensor")
        _check_finite(path, key, t)
        tensors[key] = t.detach().to("cpu").contiguous()
    atomic_write_bytes(path, safetensors.torch.save(tensors, metadata=metadata or None))


def _check_finite(path, key: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LoraFileError(f"{path}: tensor {key!r} has {bad} NaN/Inf values; the training diverged or the "
                            "file is damaged. Retrain with a lower learning rate, or use an earlier checkpoint")


def read_lora_file(path: str | os.PathLike, *, allow_pickle: bool = False,
                   max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file -> (tensors, metadata), validating the safetensors header first."""
    path = Path(path)
    if not path.exists():
        raise LoraFileError(f"no such file: {path}; check the path, or pick the file again")
    if path.is_dir():
        raise LoraFileError(f"{path} is a folder, not a LoRA file; pick the .safetensors file inside it "
                            "(diffusers names it pytorch_lora_weights.safetensors)")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle), {}
    if suffix != ".safetensors":
        raise LoraFileError(f"{path}: not a LoRA file type sdlora reads ({suffix or 'no extension'}); "
                            "use a .safetensors file")
    metadata = read_header(path, max_header_bytes)[1]
    try:
        sd = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # the header was valid, so this is a damaged data section
        raise LoraFileError(f"{path}: safetensors could not load it ({e}); the file is damaged, "
                            "download it again") from e
    for key, t in sd.items():
        _check_finite(path, key, t)
    return sd, metadata


def read_header(path: Path, max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict, dict[str, str]]:
    """Parse and check a safetensors header -> (tensor entries, metadata) without loading tensors."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise LoraFileError(f"{path}: only {size} bytes, too short for a safetensors file; it is damaged or empty")
        n = int.from_bytes(head, "little")
        if n > max_header_bytes:
            raise LoraFileError(f"{path}: header length {n} is over the {max_header_bytes}-byte limit; "
                                f"{_not_safetensors_hint(head)}")
        if n > size - 8:
            raise LoraFileError(f"{path}: header length {n} is longer than the file ({size} bytes); "
                                f"{_not_safetensors_hint(head)}")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path}: the header is not valid JSON ({e}); the file is damaged or not "
                            "safetensors") from e
    if not isinstance(header, dict):
        raise LoraFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object; "
                            "not a safetensors file")
    metadata = _check_metadata(path, header.pop("__metadata__", None))
    _check_entries(path, header, size - 8 - n)
    return header, metadata


def _not_safetensors_hint(head: bytes) -> str:
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return "this looks like a pickle/zip (.ckpt/.pt) renamed to .safetensors; rename it back and convert it"
    return "the file is damaged or not a safetensors file"


def _check_metadata(path: Path, meta) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise LoraFileError(f"{path}: '__metadata__' is a {type(meta).__name__}, must map str to str")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise LoraFileError(f"{path}: metadata {key!r} holds a {type(value).__name__} value; it must be a str")
    return meta


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    """Each entry is a float tensor whose bytes lie inside the file and overlap no other."""
    spans = []
    for key, entry in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise LoraFileError(f"{where} is not a tensor entry (needs exactly dtype, shape, data_offsets); "
                                "the file is damaged or not a LoRA")
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise LoraFileError(f"{where} has dtype {dtype!r}; LoRA weights must be one of "
                                f"{', '.join(DTYPE_SIZES)}. Re-save the file in fp16/bf16/fp32")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise LoraFileError(f"{where} has shape {shape!r}; must be a list of non-negative ints")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise LoraFileError(f"{where} has data_offsets {offs!r} outside the {data_len} data bytes; "
                                "the file is truncated or damaged, download it again")
        if offs[1] - offs[0] != math.prod(shape) * DTYPE_SIZES[dtype]:
            raise LoraFileError(f"{where}: {offs[1] - offs[0]} bytes do not fit shape {shape} of {dtype}; "
                                "the file is damaged")
        spans.append((offs[0], offs[1], key))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise LoraFileError(f"{path}: tensors {a!r} and {b!r} overlap in the file; it is damaged or crafted")


def read_pickle(path: Path, allow_pickle: bool, kind: str = "LoRA file") -> dict[str, torch.Tensor]:
    """The named tensors of a pickle file (`.ckpt`, `.pt`, `.bin`; a "state_dict" inside is taken), read only
    with ``torch.load(weights_only=True)`` and only when ``allow_pickle``; anything but finite tensors is
    refused naming the key. `kind` names what the file should be in the messages."""
    if not allow_pickle:
        raise LoraFileError(
            f"{path}: refusing to open a pickle file ({path.suffix}): unpickling can run arbitrary code. "
            "Convert it once to .safetensors where you trust it, e.g. "
            "python -c \"import torch, safetensors.torch as s; "
            f"s.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\", "
            "or pass allow_pickle=True to load it with torch.load(weights_only=True)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported [^.\n]*", str(e))      # e.g. "Unsupported global: GLOBAL io.open was ..."
        why = found.group(0).strip() if found else type(e).__name__
        raise LoraFileError(f"{path}: torch.load(weights_only=True) refused it ({why}). It holds Python objects "
                            "besides tensors, which is how malicious pickles run code; do not open it unless you "
                            "trust its source") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LoraFileError(f"{path}: holds a {type(obj).__name__}, not a dict of named tensors; not a {kind}")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise LoraFileError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor; not a {kind}")
    for key, t in obj.items():
        _check_finite(path, key, t)
    return obj


__all__ = ["LoraFileError", "atomic_write", "atomic_write_bytes", "read_pickle", "save_lora_file", "read_lora_file",
           "read_header", "PICKLE_SUFFIXES", "MAX_HEADER_BYTES"]
