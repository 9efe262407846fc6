"""The LoRA library: which files a folder holds, what each one is, and how other tools will load it.

Used by the web UI's Library and Generate tabs; reads files only, never writes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from sdlora.runs import safe_name


def lora_files(outputs: Path) -> list[Path]:
    """LoRA files in outputs/ and in its run folders (not checkpoints, not hidden folders)."""
    found = [*outputs.glob("*.safetensors"), *outputs.glob("*/*.safetensors")]
    found = [p for p in found if p.is_file() and not any(s.startswith(".") for s in p.relative_to(outputs).parts)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def lora_info(path: Path) -> dict:
    """describe() plus the preview and compatibility result; an unreadable file gives its error instead."""
    from sdlora.loras.inspect import describe
    try:
        info = describe(path)
    except Exception as e:  # a damaged file must not break the whole library
        info = {"file": str(path), "error": str(e)}
    info["name"] = path.stem
    preview = path.parent / f"{path.stem}.preview.png"
    info["preview"] = str(preview) if preview.is_file() else None
    info["compat"] = compat_summary(path.parent / "compat.json")
    return info


def _compat_tools(path: Path) -> dict | None:
    """The per-tool part of a run's compat.json ({tool: {mapped, total, unmapped, note}}), None if absent."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        tools = report.get("tools", report)
        if all(isinstance(r, dict) and {"mapped", "total"} <= set(r) for r in tools.values()):
            return tools
    except (OSError, ValueError, AttributeError):
        pass
    return {}


def compat_summary(path: Path) -> str:
    """'A1111 28/28 · ComfyUI 28/28 · diffusers 28/28' from a compat.json, or '' when there is none."""
    from sdlora.loras.tools import TOOLS
    tools = _compat_tools(path)
    if tools is None:
        return ""
    if not tools:
        return "compat.json is not readable"
    return " · ".join(f"{TOOLS.get(t, t)} {r['mapped']}/{r['total']}" for t, r in tools.items())


def compat_details(path: Path) -> str:
    """One line per tool with the keys it would skip, from compat.json."""
    from sdlora.loras.tools import format_report
    tools = _compat_tools(path)
    if tools is None:
        return "Not checked: this run folder has no compat.json."
    if not tools:
        return "compat.json is not readable."
    try:
        return format_report(tools)
    except (KeyError, TypeError):
        return compat_summary(path)


def example_trigger(folder: Path) -> str:
    """An example dataset's trigger: sdlora.json {"trigger": ...}, else 'trigger word: x' in its README,
    else the folder name."""
    try:
        trigger = json.loads((folder / "sdlora.json").read_text(encoding="utf-8")).get("trigger", "")
        if isinstance(trigger, str) and trigger.strip():
            return trigger.strip()
    except (OSError, ValueError, AttributeError):
        pass
    for readme in (folder / "README.md", folder / "README.txt"):
        if readme.is_file():
            text = readme.read_text(encoding="utf-8", errors="replace")
            m = re.search(r"trigger(?:\s+word)?\s*[:=][\s`*'\":]*([\w-]+)", text, re.IGNORECASE)
            if m:
                return m.group(1)
    return safe_name(folder.name).replace(".", "-")
