"""LoRA state dicts in the layouts other tools load (their header metadata: sdlora.loras.metadata).

One canonical in-memory form, ``LoraSet`` = {module key: ``LoraWeights``};
readers convert into it, writers out of it. Everything here is dict -> dict
(no nn.Module), so it is tested without a model. The rules come from the public
code of the consumers (summarised in docs/INTEROP.md); each is cited beside it.

Module keys are "unet.<diffusers module path>" or "text_encoder.<CLIP path>".
transformers 5 flattened ``CLIPTextModel`` (no ``.text_model``), so a
text-encoder path may come with or without "text_model."; files always carry
it (``canonical_key``), which is what A1111, ComfyUI and diffusers expect.
Readers given the base's module names return that base's own spelling.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from sdlora.bases import families
from sdlora.config import file_alpha
from sdlora.safefiles import LoraFileError, atomic_write_bytes, read_lora_file, save_lora_file

COMPONENTS = {"unet": "lora_unet", "text_encoder": "lora_te"}        # kohya-ss networks/lora.py prefixes
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")  # diffusers lora_pipeline.py lora_state_dict
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"                   # diffusers loaders/lora_base.py
# ComfyUI's own layout (comfy_extras/nodes_lora_extract.py; comfy/lora.py load_lora reads these parts).
# Its reader is sdlora.loras.comfyui; the names live here because detect_format needs them.
COMFYUI_PREFIXES = ("diffusion_model.", "text_encoders.")
COMFYUI_PARTS = {".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight",
                 ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
                 ".alpha": "alpha", ".dora_scale": "dora_scale", ".diff": "diff", ".diff_b": "diff_b"}
_CLIP_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm")      # children of CLIPTextTransformer
_UNET_ROOTS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.")


@dataclass
class LoraWeights:
    """One adapted module: W' = W + strength * (alpha / rank) * up @ down."""
    down: torch.Tensor        # [rank, in] (Linear) | [rank, in, kh, kw] (Conv2d); = PEFT lora_A
    up: torch.Tensor          # [out, rank] (Linear) | [out, rank, 1, 1] (Conv2d); = PEFT lora_B
    alpha: float              # the real alpha; scale = alpha / rank
    dora_scale: torch.Tensor | None = None  # DoRA magnitude: [out, 1] per output row (PEFT) or [1, in] (LyCORIS)

    def __post_init__(self) -> None:
        d, u = self.down, self.up
        same = d.dim() == u.dim() == 2 or (d.dim() == u.dim() == 4 and tuple(u.shape[2:]) == (1, 1))
        if not (same and u.shape[1] == d.shape[0]):
            raise ValueError(f"LoRA pair does not fit: down {tuple(d.shape)}, up {tuple(u.shape)}; expected down "
                             "[rank, in] + up [out, rank] (Linear) or [rank, in, kh, kw] + [out, rank, 1, 1] (Conv2d)")
        self.alpha = float(self.alpha)
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha!r} is not allowed: use a finite number > 0 (scale = alpha / rank)")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraSet = dict[str, LoraWeights]


def canonical_key(key: str) -> str:
    """The key as files spell it: a flattened text-encoder path gets its "text_model." back."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"LoRA key {key!r} must be 'unet.<module path>' or 'text_encoder.<module path>'")
    if component == "text_encoder" and path.startswith(_CLIP_CHILDREN):
        path = "text_model." + path
    return f"{component}.{path}"


def kohya_name(key: str) -> str:
    """"unet.a.b" -> "lora_unet_a_b"; "text_encoder.x" -> "lora_te_text_model_x" (INTEROP.md section 1)."""
    component, path = canonical_key(key).split(".", 1)
    return f"{COMPONENTS[component]}_{path.replace('.', '_')}"


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype).contiguous()


def _scalar(t: torch.Tensor) -> float | None:
    """A 0-dim/1-element alpha as a float, rounded to fp32's 7 digits (so 0.1 stays 0.1); None if not scalar."""
    return float(f"{float(t.item()):.7g}") if t.numel() == 1 else None


# ---- kohya: lora_unet_<path>.lora_down.weight / .lora_up.weight / .alpha ---------------------------------

def to_kohya(loras: LoraSet, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """kohya layout; ``.alpha`` is the real alpha as an fp32 0-dim tensor (every reader calls ``.item()``)."""
    sd: dict[str, torch.Tensor] = {}
    for key in sorted(loras):
        w, name = loras[key], kohya_name(key)
        if f"{name}.alpha" in sd:
            raise ValueError(f"{key!r} and another module both become the kohya name {name!r}; drop one of them")
        sd[f"{name}.lora_down.weight"] = _cast(w.down, dtype)
        sd[f"{name}.lora_up.weight"] = _cast(w.up, dtype)
        sd[f"{name}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
        if w.dora_scale is not None:
            sd[f"{name}.dora_scale"] = _cast(w.dora_scale, dtype)
    return sd


def from_kohya(sd: dict[str, torch.Tensor], module_names: dict[str, set[str]]) -> tuple[LoraSet, list[str]]:
    """kohya layout -> LoraSet keyed by the given module paths, plus every key that could not be used.

    ``module_names`` = {"unet": {...}, "text_encoder": {...}} (the base's dotted paths); names are
    resolved by building kohya_name(path) -> path, never by guessing where underscores were dots.
    Unusable: names of no given module (SDXL lora_te1_/lora_te2_ on SD 1.x), LoCon/LoHa parts,
    down without up, shapes that do not pair.
    """
    lookup = {kohya_name(f"{c}.{p}"): f"{c}.{p}" for c, names in module_names.items() if c in COMPONENTS
              for p in names}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        name, _, part = k.partition(".")
        groups.setdefault(name, {})[part] = t
    loras: LoraSet = {}
    unused: list[str] = []
    for name, parts in groups.items():
        w = _kohya_weights(parts) if name in lookup else None
        if w is None:
            unused += [f"{name}.{p}" if p else name for p in parts]
        else:
            loras[lookup[name]] = w
    return loras, sorted(unused)


def _kohya_weights(parts: dict[str, torch.Tensor]) -> LoraWeights | None:
    if set(parts) - set(KOHYA_PARTS) or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
        return None                           # LoCon mid / LoHa / half a pair: not a plain LoRA module
    down = parts["lora_down.weight"]
    alpha = _scalar(parts["alpha"]) if "alpha" in parts else 0.0
    if alpha is None:                         # an alpha that is not one number
        return None
    if not alpha:                             # no (or 0) alpha means alpha = rank: kohya networks/lora.py, A1111
        alpha = float(down.shape[0])
    try:
        return LoraWeights(down, parts["lora_up.weight"], alpha, parts.get("dora_scale"))
    except ValueError:
        return None


# ---- diffusers / PEFT: unet.<path>.lora_A.weight, alpha in the header's lora_adapter_metadata -----------

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
        sd[f"{ck}.lora_A.weight"] = _cast(w.down, dtype)
        sd[f"{ck}.lora_B.weight"] = _cast(w.up, dtype)
        if w.dora_scale is not None:
            sd[f"{ck}.lora_magnitude_vector.weight"] = _cast(_peft_magnitude(key, w), dtype)
        component, path = ck.split(".", 1)
        per_component.setdefault(component, {})[path] = w
    flat = {f"{c}.{field}": value for c, items in per_component.items()
            for field, value in _peft_config(c, items).items()}
    return sd, {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(flat, indent=2, sort_keys=True)}


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _peft_config(component: str, items: dict[str, LoraWeights]) -> dict:
    """LoraConfig fields. PEFT matches pattern/target names as a suffix after a dot (peft utils/other.py
    get_pattern_key, tuners_utils check_target_module_exists), so a text-encoder path without
    "text_model." matches both the nested and the flattened CLIPTextModel."""
    def name(path: str) -> str:
        return path.removeprefix("text_model.") if component == "text_encoder" else path
    r = _most_common(w.rank for w in items.values())
    alpha = _most_common(w.alpha for w in items.values())
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


def _parse_diffusers_key(k: str) -> tuple[str, str] | None:
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
    if path.startswith(("text_model.",) + _CLIP_CHILDREN):    # bare PEFT keys: the path tells the component
        path = "text_encoder." + path
    elif path.startswith(_UNET_ROOTS):
        path = "unet." + path
    return (canonical_key(path), part) if path.startswith(("unet.", "text_encoder.")) else None


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
    resolve = _resolver(module_names)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unused: list[str] = []
    for k, t in sd.items():
        parsed = _parse_diffusers_key(k)
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


def _resolver(module_names: dict[str, set[str]] | None):
    if module_names is None:
        return lambda ck: ck
    table = {canonical_key(f"{c}.{p}"): f"{c}.{p}" for c, names in module_names.items() if c in COMPONENTS
             for p in names}
    return table.get


def _diffusers_weights(ck: str, parts: dict, configs: dict) -> LoraWeights | None:
    if "down" not in parts or "up" not in parts:
        return None
    down, up = parts["down"][1], parts["up"][1]
    alpha = _scalar(parts["alpha"][1]) if "alpha" in parts else _config_alpha(ck, down.shape[0], configs)
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


# ---- detection --------------------------------------------------------------------------------------------

def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """"kohya" | "comfyui" (diffusion_model./text_encoders. keys) | "diffusers" (unet./text_encoder.)
    | "peft" (bare module paths) | "unknown"."""
    if any(k.startswith(KOHYA_PREFIXES) for k in sd):
        return "kohya"
    if any(k.startswith(COMFYUI_PREFIXES) and k.endswith(tuple(COMFYUI_PARTS)) for k in sd):
        return "comfyui"
    parsed = {k: _parse_diffusers_key(k) for k in sd}
    if any(p and k.startswith(("unet.", "text_encoder.")) for k, p in parsed.items()):
        return "diffusers"
    return "peft" if any(parsed.values()) else "unknown"


# A down weight is [rank, in]; a ComfyUI full delta (.diff) is [out, in]: both give the input width.
_DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_linear_layer.down.weight",
                  ".diff")


def detect_family(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """"sd1" | "sd2" | "sdxl" | "unknown": tensor shapes first, then kohya/ModelSpec metadata."""
    family = _family_from_shapes(sd)
    return family if family != families.UNKNOWN else _family_from_metadata(metadata or {})


def _family_from_shapes(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")) for k in sd):
        return "sdxl"                                   # two text encoders: SDXL (INTEROP.md section 1)
    te = None
    for k, t in sd.items():
        if not k.endswith(_DOWN_SUFFIXES) or t.dim() < 2:
            continue
        flat = k.replace(".", "_").replace("processor_", "")
        by_width = families.by_context_dim(int(t.shape[1]))
        if ("attn2_to_k" in flat or "attn2_to_v" in flat) and by_width != families.UNKNOWN:
            return by_width                             # cross-attention k/v read the text embedding
        if te is None and k.startswith(("lora_te_", "text_encoder.", "text_encoders.")) and "q_proj" in flat:
            te = families.by_text_width(int(t.shape[1]))
    return te if te not in (None, families.UNKNOWN) else families.UNKNOWN


def _family_from_metadata(meta: dict[str, str]) -> str:
    """kohya's ss_base_model_version (A1111 reads it), then the ModelSpec architecture, then ss_v2."""
    for guess in (families.by_ss_version(str(meta.get("ss_base_model_version", ""))),
                  families.by_architecture(str(meta.get("modelspec.architecture", ""))),
                  families.by_ss_v2(str(meta.get("ss_v2", "")))):
        if guess != families.UNKNOWN:
            return guess
    return families.UNKNOWN


__all__ = ["LoraWeights", "LoraSet", "LORA_ADAPTER_METADATA_KEY", "COMFYUI_PREFIXES", "canonical_key", "kohya_name",
           "to_kohya", "from_kohya", "to_diffusers", "from_diffusers", "adapter_configs", "detect_format",
           "detect_family",
           "LoraFileError", "atomic_write_bytes", "save_lora_file", "read_lora_file"]
