"""Will each tool load every key of a kohya-format LoRA? A per-tool simulation of its key mapping.

A1111 and ComfyUI skip keys they cannot map with only a console line, and
diffusers raises on keys it cannot convert (INTEROP.md section 1), so a file
can "load" and silently do nothing. ``compat_report`` replays each tool's
mapping rule against the base model's module names and counts what lands:

- A1111: extensions-builtin/Lora/networks.py ``convert_diffusers_name_to_compvis``
  (diffusers names -> original-SD names) plus its two fall-backs in ``load_network``.
- ComfyUI: comfy/lora.py ``model_lora_keys_unet`` ("lora_unet_" + every UNet weight
  name, diffusers or original-SD spelling) and ``model_lora_keys_clip``.
- diffusers: loaders/lora_conversion_utils.py ``_convert_non_diffusers_lora_to_diffusers``
  (every "_" becomes "." and known compound names are joined again).
The rules are re-written here from reading those files; SD 1.x/2.x naming in ``compat_report``, SDXL's
(SGM U-Net names, lora_te1_ / lora_te2_) in ``compat_report_sdxl``.
"""
from __future__ import annotations

import re
from typing import Iterable

import torch

from sdlora.loras.layouts import KOHYA_PARTS, KOHYA_PREFIXES, canonical_key, kohya_name

TOOLS = {"a1111": "A1111", "comfyui": "ComfyUI", "diffusers": "diffusers"}

# A1111 networks.py suffix_conversion: resnet layer names in the original SD UNet.
_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
                 "conv_shortcut": "skip_connection"}
_A1111_RULES = (
    (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
    (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{_a1111_sub(m[2], m[4])}"),
    (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_"
               f"{_a1111_suffix(m[1], m[3])}"),
    (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
     lambda m: f"diffusion_model_output_blocks_{3 * int(m[1]) + int(m[3])}_{_a1111_sub(m[2], m[4])}"),
    (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
     lambda m: f"diffusion_model_input_blocks_{3 + 3 * int(m[1])}_0_op"),
    (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
     lambda m: f"diffusion_model_output_blocks_{2 + 3 * int(m[1])}_{2 if int(m[1]) > 0 else 1}_conv"),
    (r"lora_te_text_model_encoder_layers_(\d+)_(.+)", lambda m: f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"),
)


def _a1111_suffix(kind: str, rest: str) -> str:
    return _A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _a1111_sub(kind: str, rest: str) -> str:
    return f"{1 if kind == 'attentions' else 0}_{_a1111_suffix(kind, rest)}"


def a1111_target(name: str) -> str | None:
    """kohya module name -> the original-SD module name A1111 looks up (SD 1.x); None if no rule applies.

    e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q
      -> diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_q
    """
    for pattern, build in _A1111_RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return build(m)
    return None


def _a1111_candidates(name: str) -> list[str]:
    """The rule's target, then load_network's fall-backs (already-original names; SD1 files named te1)."""
    out = [t for t in (a1111_target(name),) if t]
    if name.startswith("lora_unet_"):
        out.append(name.replace("lora_unet", "diffusion_model", 1))
    if name.startswith("lora_te1_text_model"):
        out.append(name.replace("lora_te1_text_model", "transformer_text_model", 1))
    return out


# comfy/lora.py LORA_CLIP_MAP: the CLIP layers ComfyUI maps, layers 0..31, "lora_te_" or "lora_te1_".
_COMFY_CLIP = {"mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "self_attn_q_proj": "self_attn.q_proj",
               "self_attn_k_proj": "self_attn.k_proj", "self_attn_v_proj": "self_attn.v_proj",
               "self_attn_out_proj": "self_attn.out_proj"}
_COMFY_TE = re.compile(r"lora_te1?_text_model_encoder_layers_(\d+)_(" + "|".join(_COMFY_CLIP) + ")")


def _comfy_unet_table(unet_modules: Iterable[str]) -> dict[str, str]:
    return {kohya_name(f"unet.{p}"): f"unet.{p}" for p in unet_modules}


def comfy_target(name: str, unet_modules: Iterable[str] = (),
                 ldm_unet_modules: Iterable[str] | None = None) -> str | None:
    """kohya module name -> the module ComfyUI patches, or None.

    UNet: ComfyUI registers "lora_unet_" + name.replace(".", "_") for each UNet weight, in both the
    diffusers and the original-SD spelling, so the target must be a real module of the base.
    CLIP: "lora_te_text_model_encoder_layers_{n}_{layer}" for the six layers of _COMFY_CLIP.
    """
    return _comfy(name, _comfy_unet_table(unet_modules), set(ldm_unet_modules or ()))


def _comfy(name: str, unet_table: dict[str, str], ldm: set[str]) -> str | None:
    if name in unet_table:
        return unet_table[name]
    if name.startswith("lora_unet_") and "diffusion_model_" + name[len("lora_unet_"):] in ldm:
        return "diffusion_model_" + name[len("lora_unet_"):]
    m = _COMFY_TE.fullmatch(name)
    if m and int(m[1]) < 32:
        return f"text_encoder.text_model.encoder.layers.{m[1]}.{_COMFY_CLIP[m[2]]}"
    return None


# Compound names diffusers joins again after turning every "_" into "." (lora_conversion_utils.py
# _convert_unet_lora_key / _convert_text_encoder_lora_key). Anything else keeps its dots.
_DIFFUSERS_UNET_WORDS = ("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "proj_in", "proj_out",
                         "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding", "linear_1",
                         "linear_2", "to_q", "to_k", "to_v", "to_out")
_DIFFUSERS_TE_WORDS = ("text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection")
_DIFFUSERS_COMPONENT = {"lora_unet_": ("unet", _DIFFUSERS_UNET_WORDS),
                        "lora_te_": ("text_encoder", _DIFFUSERS_TE_WORDS),
                        "lora_te1_": ("text_encoder", _DIFFUSERS_TE_WORDS),
                        "lora_te2_": ("text_encoder_2", _DIFFUSERS_TE_WORDS)}


def diffusers_accepts(name: str) -> bool:
    """diffusers treats a file as kohya only if every key starts with one of these (lora_pipeline.py)."""
    return name.startswith(KOHYA_PREFIXES)


def diffusers_target(name: str) -> str | None:
    """kohya module name -> "<component>.<module path>" as diffusers converts it; None if not accepted."""
    prefix = next((p for p in _DIFFUSERS_COMPONENT if name.startswith(p)), None)
    if prefix is None:
        return None
    component, words = _DIFFUSERS_COMPONENT[prefix]
    dotted = name[len(prefix):].replace("_", ".")
    for word in words:
        dotted = re.sub(rf"(?<![^.]){re.escape(word.replace('_', '.'))}(?![^.])", word, dotted)
    return f"{component}.{dotted}"


def _groups(sd: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for k in sd:
        name, _, part = k.partition(".")
        out.setdefault(name, set()).add(part)
    return out


def _diffusers_file_problem(groups: dict[str, set[str]]) -> str:
    """Why diffusers' kohya converter would refuse the whole file, or ''."""
    foreign = sorted(n for n in groups if not diffusers_accepts(n))
    if foreign:
        return f"not every key starts with {'/'.join(KOHYA_PREFIXES)} (e.g. {foreign[0]}), so it is not read as kohya"
    left = sorted(f"{n}.{p}" for n, parts in groups.items() for p in parts
                  if p not in KOHYA_PARTS or "lora_down.weight" not in parts or "lora_up.weight" not in parts)
    return f"its converter raises on keys it cannot convert (e.g. {left[0]})" if left else ""


def _alpha_note(sd: dict[str, torch.Tensor]) -> str:
    alphas = {round(float(t.item()), 6) for k, t in sd.items() if k.endswith(".alpha") and t.numel() == 1}
    return ("alphas differ between modules: diffusers 0.42 gives every module the most common one from kohya "
            "files (its alpha_pattern names miss); the diffusers format keeps them") if len(alphas) > 1 else ""


def compat_report(sd: dict[str, torch.Tensor], *, unet_modules: set[str], text_encoder_modules: set[str],
                  ldm_unet_modules: set[str] | None = None) -> dict[str, dict]:
    """{tool: {"mapped", "total", "unmapped": [module names], "note"}} for a kohya-format state dict.

    Module sets are the base's dotted diffusers paths; ``ldm_unet_modules`` the original-SD names A1111
    sees ("diffusion_model_input_blocks_1_1_..."). Without it A1111's UNet targets are checked by
    name rule only (said in "note").
    """
    groups = _groups(sd)
    te = {canonical_key(f"text_encoder.{p}") for p in text_encoder_modules}
    targets = te | {f"unet.{p}" for p in unet_modules}            # what diffusers and ComfyUI can patch
    a1111_known = set(ldm_unet_modules or ()) | {"transformer_" + k.split(".", 1)[1].replace(".", "_") for k in te}
    table, ldm = _comfy_unet_table(unet_modules), set(ldm_unet_modules or ())
    problem = _diffusers_file_problem(groups)

    def a1111_ok(name: str) -> bool:
        if ldm_unet_modules is None and name.startswith("lora_unet_"):
            return a1111_target(name) is not None
        return any(t in a1111_known for t in _a1111_candidates(name))

    def comfy_ok(name: str) -> bool:
        t = _comfy(name, table, ldm)
        return t is not None and (t in targets or t in ldm)

    checks = {"a1111": a1111_ok, "comfyui": comfy_ok,
              "diffusers": lambda n: not problem and diffusers_target(n) in targets}
    notes = {"a1111": "" if ldm_unet_modules is not None else
             "UNet keys checked by name rule only (no original-SD module names given)",
             "comfyui": "", "diffusers": problem or _alpha_note(sd)}
    return _tool_report(groups, checks, notes)


# ---- SDXL (docs/SDXL.md) ---------------------------------------------------------------------------------
# A1111 (extensions-builtin/Lora/networks.py): U-Net keys by the "lora_unet" -> "diffusion_model" fall-back
# (kohya's SDXL names are already the SGM module names); lora_te1_text_model_* -> 0_transformer_text_model_*;
# lora_te2_text_model_encoder_layers_N_* -> 1_model_transformer_resblocks_N_* on open_clip's modules, where
# q/k/v/out of a layer are applied together to the fused in_proj (a layer missing one of the four gets none).
_XL_TE2 = re.compile(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")
_XL_A1111_TE2 = ("mlp_fc1", "mlp_fc2", "self_attn_out_proj")
_XL_QKV = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj")


def _te_names(prefix: str, component: str, modules: Iterable[str]) -> set[str]:
    return {prefix + canonical_key(f"{component}.{p}").split(".", 1)[1].replace(".", "_") for p in modules}


def compat_report_sdxl(sd: dict[str, torch.Tensor], *, unet_modules: set[str], text_encoder_modules: set[str],
                       text_encoder_2_modules: set[str], unet_names: dict[str, str]) -> dict[str, dict]:
    """compat_report for an SDXL base: `unet_names` maps its diffusers U-Net paths to their SGM names."""
    groups = _groups(sd)
    sgm = {"lora_unet_" + unet_names[p].replace(".", "_") for p in unet_modules if p in unet_names}
    diffusers_named = {"lora_unet_" + p.replace(".", "_") for p in unet_modules}
    te1 = _te_names("lora_te1_", "text_encoder", text_encoder_modules)
    te2 = _te_names("lora_te2_", "text_encoder_2", text_encoder_2_modules)
    problem = _diffusers_file_problem(groups)

    def a1111_ok(name: str) -> bool:
        if name in sgm or name in te1:
            return True
        m = _XL_TE2.fullmatch(name)
        if name not in te2 or m is None:
            return False
        if m[2] in _XL_A1111_TE2:
            return True
        quartet = [f"lora_te2_text_model_encoder_layers_{m[1]}_{q}" for q in (*_XL_QKV, "self_attn_out_proj")]
        return m[2] in _XL_QKV and all(q in groups for q in quartet)

    def comfy_ok(name: str) -> bool:              # comfy/lora.py model_lora_keys_unet / model_lora_keys_clip
        if name in sgm or name in diffusers_named:
            return True
        m = re.fullmatch(r"lora_te[12]_text_model_encoder_layers_(\d+)_(.+)", name)
        return m is not None and m[2] in _COMFY_CLIP and (name in te1 or name in te2)

    checks = {"a1111": a1111_ok, "comfyui": comfy_ok,
              "diffusers": lambda n: not problem and (n in sgm or n in diffusers_named or n in te1 or n in te2)}
    notes = {"a1111": "", "comfyui": "", "diffusers": problem or _alpha_note(sd)}
    return _tool_report(groups, checks, notes)


def _tool_report(groups: dict[str, set[str]], checks: dict, notes: dict[str, str]) -> dict[str, dict]:
    """{tool: {"mapped", "total", "unmapped", "note"}} from each tool's per-module-name check."""
    report = {}
    for tool, ok in checks.items():
        unmapped = [n for n in sorted(groups) if not ok(n)]
        report[tool] = {"mapped": len(groups) - len(unmapped), "total": len(groups), "unmapped": unmapped,
                        "note": notes[tool]}
    return report


def format_report(report: dict[str, dict]) -> str:
    """One line per tool, e.g. "A1111: 64/64 mapped", then up to 5 unmapped names and any note."""
    lines = []
    for tool, r in report.items():
        line = f"{TOOLS.get(tool, tool)}: {r['mapped']}/{r['total']} mapped"
        if r["unmapped"]:
            more = f" (+{len(r['unmapped']) - 5} more)" if len(r["unmapped"]) > 5 else ""
            line += "; not mapped: " + ", ".join(r["unmapped"][:5]) + more
        if r.get("note"):
            line += f" [{r['note']}]"
        lines.append(line)
    return "\n".join(lines)


__all__ = ["TOOLS", "a1111_target", "comfy_target", "diffusers_target", "diffusers_accepts", "compat_report",
           "compat_report_sdxl", "format_report"]
