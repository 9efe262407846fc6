"""The diffusers / PEFT LoRA layout: `unet.<path>.lora_A.weight` / `lora_B.weight`, alpha in the header.

Writes what diffusers' `load_lora_weights` reads back exactly (ranks and alphas per module through
`lora_adapter_metadata`), and reads every spelling diffusers and PEFT have used (DreamBooth's
`.lora.down.weight`, `lora_linear_layer`, the old attention-processor keys, bare PEFT paths).
"""
from __future__ import annotations

import json
import re

import torch

from sdlora.config import file_alpha
from sdlora.loras.layouts import (CLIP_CHILDREN, COMPONENTS, UNET_ROOTS, LoraSet, LoraWeights, canonical_key, cast,
                                  module_resolver, most_common, scalar)

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"                   # diffusers loaders/lora_base.py


def to_diffusers(loras: LoraSet, dtype: torch.dtype = torch.float16) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers layout + header metadata from which ``load_lora_weights`` builds each LoraConfig.

    diffusers 0.42 reads ``__metadata__["lora_adapter_metadata"]`` (JSON, keys "<component>.<LoraConfig
    field>") and calls ``LoraConfig(**fields)`` (utils/peft_utils.py _create_lora_config), so alpha,
    per-module alphas (alpha_pattern) and ranks arrive exactly.
    """
    sd: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, LoraWeights]] = {}
    for key in sorted(loras):
        w, ck = loras[key], canonical_key(key)
        if f"{ck}.lora_A.weight" in sd:
            raise ValueError(f"{key!r} and another key both name the module {ck!r}; drop one of them")
        sd[f"{ck}.lora_A.weight"] = cast(w.down, dtype)
        sd[f"{ck}.lora_B.weight"] = cast(w.up, dtype)
        if w.dora_scale is not None:
            sd[f"{ck}.lora_magnitude_vector.weight"] = cast(_peft_magnitude(key, w), dtype)
        component, path = ck.split(".", 1)
        per_component.setdefault(component, {})[path] = w
    flat = {f"{c}.{field}": value for c, items in per_component.items()
            for field, value in _peft_config(c, items).items()}
    return sd, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}


def _peft_config(component: str, items: dict[str, LoraWeights]) -> dict:
    """LoraConfig fields. PEFT matches pattern/target names as a suffix after a dot (peft utils/other.py
    get_pattern_key, tuners_utils check_target_module_exists), so a text-encoder path without
    "text_model." matches both the nested and the flattened CLIPTextModel."""
    def name(path: str) -> str:
        return path.removeprefix("text_model.") if component == "text_encoder" else path
    r = most_common(w.rank for w in items.values())
    alpha = most_common(w.alpha for w in items.values())
    return {"r": r, "lora_alpha": alpha,
            "rank_pattern": {name(p): w.rank for p, w in items.items() if w.rank != r},
            "alpha_pattern": {name(p): w.alpha for p, w in items.items() if w.alpha != alpha},
            "target_modules": sorted(name(p) for p in items),
            "use_dora": any(w.dora_scale is not None for w in items.values()),
            "use_rslora": False, "lora_dropout": 0.0, "bias": "none"}


def _peft_magnitude(key: str, w: LoraWeights) -> torch.Tensor:
    m, out = w.dora_scale, w.up.shape[0]
    if m.dim() == 0 or m.shape[0] != out or m.numel() != out:
        raise ValueError(f"{key}: DoRA scale of shape {tuple(m.shape)} is not one value per output row; "
                         "PEFT/diffusers store [out] magnitudes. Save this LoRA in kohya format instead")
    return m.reshape(-1)


_DIFFUSERS_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
                       (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                       (".lora_linear_layer.up.weight", "up"), (".lora_magnitude_vector.weight", "dora"),
                       (".lora_magnitude_vector", "dora"), (".alpha", "alpha"))
# Older diffusers attention-processor keys: "<block>.attn2.processor.to_q_lora.down.weight".
_OLD_ATTN = re.compile(r"^(?P<m>.+?)\.(?:processor\.)?(?P<p>to_[qkv]|to_out)_lora\.(?P<d>down|up)\.weight$")
_OLD_PROJ = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
             "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


def parse_diffusers_key(k: str) -> tuple[str, str] | None:
    """'unet.<path>.lora_A.weight' (and older spellings, bare PEFT keys) -> (canonical key, part)."""
    k = k.removeprefix("base_model.model.")
    m = _OLD_ATTN.match(k)
    if m:
        component = "text_encoder" if k.startswith(("text_encoder.", "text_model.")) else "unet"
        path, part = f"{m['m']}.{_OLD_PROJ[component][m['p']]}", m["d"]
    else:
        hit = next(((k[: -len(s)], p) for s, p in _DIFFUSERS_SUFFIXES if k.endswith(s)), None)
        if hit is None:
            return None
        path, part = hit
    if path.startswith(("text_model.",) + CLIP_CHILDREN):    # bare PEFT keys: the path tells the component
        path = "text_encoder." + path
    elif path.startswith(UNET_ROOTS):
        path = "unet." + path
    return (canonical_key(path), part) if path.startswith(("unet.", "text_encoder.", "text_encoder_2.")) else None


def adapter_configs(metadata: dict[str, str]) -> dict[str, dict]:
    """diffusers' lora_adapter_metadata -> {component: LoraConfig fields}; {} when absent."""
    raw = (metadata or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"header metadata {LORA_ADAPTER_METADATA_KEY!r} is not valid JSON ({e}); "
                         "the file is damaged, or re-save it with diffusers") from e
    out: dict[str, dict] = {}
    for k, v in flat.items() if isinstance(flat, dict) else ():
        component, _, field = k.partition(".")
        if component in COMPONENTS and field:
            out.setdefault(component, {})[field] = v
    return out


def from_diffusers(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                   module_names: dict[str, set[str]] | None = None) -> tuple[LoraSet, list[str]]:
    """diffusers/PEFT layout -> LoraSet, plus every key that could not be used.

    Alpha per module: an ``<path>.alpha`` tensor, else the LoraConfig in ``lora_adapter_metadata``
    (alpha_pattern, then lora_alpha; rsLoRA converted to alpha/rank), else alpha = rank
    (diffusers utils/peft_utils.py get_peft_kwargs). Keys are canonical ("text_model." kept)
    unless ``module_names`` is given; then they are the base's own paths and others are unusable.
    """
    configs = adapter_configs(metadata or {})
    resolve = module_resolver(module_names)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unused: list[str] = []
    for k, t in sd.items():
        parsed = parse_diffusers_key(k)
        if parsed is None:
            unused.append(k)
        else:
            groups.setdefault(parsed[0], {})[parsed[1]] = (k, t)
    loras: LoraSet = {}
    for ck, parts in groups.items():
        key = resolve(ck)
        w = _diffusers_weights(ck, parts, configs) if key else None
        if w is None:
            unused += [k for k, _ in parts.values()]
        else:
            loras[key] = w
    return loras, sorted(unused)


def _diffusers_weights(ck: str, parts: dict, configs: dict) -> LoraWeights | None:
    if "down" not in parts or "up" not in parts:
        return None
    down, up = parts["down"][1], parts["up"][1]
    alpha = scalar(parts["alpha"][1]) if "alpha" in parts else _config_alpha(ck, down.shape[0], configs)
    if alpha is None:                         # an alpha tensor that is not one number
        return None
    dora = parts["dora"][1] if "dora" in parts else None
    if dora is not None and dora.dim() == 1:
        dora = dora.reshape(-1, 1)            # PEFT [out] -> canonical [out, 1]
    try:
        return LoraWeights(down, up, alpha or float(down.shape[0]), dora)
    except ValueError:
        return None


def _config_alpha(ck: str, rank: int, configs: dict) -> float:
    component, path = ck.split(".", 1)
    cfg = configs.get(component)
    if not cfg:
        return float(rank)
    alpha = float(cfg.get("lora_alpha", 8))           # PEFT LoraConfig default lora_alpha = 8
    patterns = cfg.get("alpha_pattern") or {}
    names = (path, path.removeprefix("text_model.")) if component == "text_encoder" else (path,)
    pat = next((p for p in patterns if any(_pattern_matches(p, n) for n in names)), None)
    if pat is not None:
        alpha = float(patterns[pat])
    return file_alpha(alpha, rank, bool(cfg.get("use_rslora")))


def _pattern_matches(pattern: str, path: str) -> bool:
    """PEFT's rule: the pattern (a regex) matches the whole path or its tail after a dot."""
    try:
        return re.fullmatch(rf"(?:.*\.)?(?:{pattern})", path) is not None
    except re.error:
        return pattern == path




__all__ = ["LORA_ADAPTER_METADATA_KEY", "to_diffusers", "from_diffusers", "adapter_configs", "parse_diffusers_key"]
