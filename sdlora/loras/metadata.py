"""The metadata a LoRA file carries in its safetensors header (every value a str), and the sidecar JSON.

The ``ss_*`` keys are kohya-ss's (A1111's and ComfyUI's info panels and the
civitai importer read them), ``modelspec.*`` is Stability's model spec, and the
hashes are sd-webui-additional-networks'. The rules are summarised in
docs/INTEROP.md.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime

import safetensors.torch
import torch

from sdlora.bases import families
from sdlora.loras.layouts import LoraSet, most_common



def build_metadata(*, loras: LoraSet, trigger: str, steps: int, num_images: int, resolution: int | tuple[int, int],
                   seed: int, lr: float, base_name: str, output_name: str, rank: int | None = None,
                   alpha: float | None = None, text_encoder: bool = False, extra: dict | None = None,
                   prediction_type: str = "epsilon", family: str = "sd1", tag_frequency: dict | None = None,
                   training_started_at: float | str | None = None, text_encoder_lr: float | None = None,
                   network_args: dict | None = None, description: str | None = None, author: str | None = None,
                   license: str | None = None, thumbnail: str | None = None, epoch: int | None = None,
                   now: float | None = None) -> dict[str, str]:
    """kohya ``ss_*`` + ModelSpec 1.0.1 metadata (INTEROP.md section 3). Hashes: ``add_hashes`` once tensors exist.

    ``rank``/``alpha`` default to the most common among ``loras``; ``extra`` adds keys (dict values
    are JSON-encoded) and may not replace a computed one.
    """
    fam = families.family(family)                 # FamilyError (a ValueError) names what is allowed
    # ModelSpec spells it "epsilon" / "v"; diffusers' scheduler configs (Base.prediction_type) "v_prediction"
    prediction_type = {"v_prediction": "v"}.get(prediction_type, prediction_type)
    if prediction_type not in ("epsilon", "v"):
        raise ValueError(f"prediction_type={prediction_type!r} is not allowed: use 'epsilon', 'v' or 'v_prediction'")
    if not loras:
        raise ValueError("loras is empty: there is nothing to describe")
    now = time.time() if now is None else float(now)
    w, h = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    rank = most_common(x.rank for x in loras.values()) if rank is None else rank
    alpha = most_common(x.alpha for x in loras.values()) if alpha is None else alpha
    if network_args is None:
        network_args = {"dora_wd": "True"} if any(x.dora_scale is not None for x in loras.values()) else {}
    meta = {
        "ss_v2": fam.ss_v2, "ss_base_model_version": fam.ss_base_model_version, "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)), "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(network_args), "ss_steps": str(steps), "ss_max_train_steps": str(steps),
        "ss_num_train_images": str(num_images), "ss_resolution": str((w, h)), "ss_seed": str(seed),
        "ss_learning_rate": str(lr), "ss_unet_lr": str(lr),
        "ss_sd_model_name": os.path.basename(base_name) if os.path.exists(base_name) else base_name,
        "ss_output_name": output_name, "ss_training_started_at": _unix_time(training_started_at, now),
        "ss_tag_frequency": json.dumps(_nested_tags(tag_frequency or {})),
    }
    if text_encoder:
        meta["ss_text_encoder_lr"] = str(lr if text_encoder_lr is None else text_encoder_lr)
    if epoch is not None:
        meta["ss_epoch"] = str(epoch)
    meta.update(_modelspec(fam.name, prediction_type, output_name, f"{w}x{h}", now, trigger=trigger,
                           description=description, author=author, license=license, thumbnail=thumbnail))
    for key, value in (extra or {}).items():
        if key in meta:
            raise ValueError(f"extra metadata {key!r} would replace a computed value; use another key")
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def _modelspec(family: str, prediction_type: str, title: str, resolution: str, now: float, **optional) -> dict:
    """Stability ModelSpec 1.0.1 (architecture/implementation as kohya-ss library/sai_model_spec.py)."""
    arch = families.modelspec_architecture(family, prediction_type)
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": families.family(family).modelspec_implementation, "modelspec.title": title,
            "modelspec.resolution": resolution, "modelspec.prediction_type": prediction_type,
            "modelspec.date": datetime.fromtimestamp(int(now)).astimezone().isoformat()}
    names = {"trigger": "trigger_phrase"}
    meta.update({f"modelspec.{names.get(k, k)}": str(v) for k, v in optional.items() if v})
    return meta


def _unix_time(value: float | str | None, now: float) -> str:
    """kohya stores str(time.time()); accept a number, a numeric string or ISO-8601 (train.py's started_at)."""
    if value is None or value == "":
        return str(now)
    try:
        return str(float(value))
    except ValueError:
        try:
            return str(datetime.fromisoformat(str(value)).timestamp())
        except ValueError as e:
            raise ValueError(f"training_started_at={value!r} is not allowed: use a unix time or ISO-8601") from e


def _nested_tags(tags: dict) -> dict:
    """kohya's ss_tag_frequency is {dataset: {tag: count}}; A1111's metadata editor reads that shape."""
    return {"images": tags} if tags and all(isinstance(v, int) for v in tags.values()) else tags


def add_hashes(sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash`` / ``sshs_legacy_hash`` of the final tensors.

    As kohya-ss library/train_util.py precalculate_safetensors_hashes: serialize with only the
    ``ss_*`` keys (so later user edits do not change the hash); model hash = sha256 of the bytes
    after the header; legacy = first 8 hex of sha256 of 0x10000 bytes at offset 0x100000.
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save({k: t.detach().cpu().contiguous() for k, t in sd.items()}, metadata=training or None)
    model_hash, legacy_hash = addnet_hashes(data)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def addnet_hashes(data: bytes) -> tuple[str, str]:
    """(model hash, legacy hash) of safetensors bytes, as sd-webui-additional-networks defined them."""
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def sidecar_json(trigger: str, preferred_weight: float = 1.0, family: str = "sd1", description: str = "",
                 notes: str = "", negative_text: str = "") -> dict:
    """A1111's ``<name>.json`` beside the LoRA (extensions-builtin/Lora/ui_edit_user_metadata.py)."""
    version = families.family(family).sidecar_version if family in families.FAMILIES else "Unknown"
    return {"description": description, "sd version": version, "activation text": trigger,
            "preferred weight": float(preferred_weight), "negative text": negative_text, "notes": notes}


__all__ = ["build_metadata", "add_hashes", "addnet_hashes", "sidecar_json"]
