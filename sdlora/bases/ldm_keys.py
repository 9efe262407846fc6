"""VAE and text-encoder key layouts: diffusers/transformers <-> original SD (LDM).

Pure functions on `dict[str, Tensor]`. Each copies its input, pops every key it
converts, and raises `CheckpointError` naming whatever is left over. LDM keys
here carry no `first_stage_model.` / `cond_stage_model.` prefix (`sdlora.bases.single_file`
adds it); the `*_from_ldm` functions accept them with or without it.

Sources for the layouts: CompVis `ldm/modules/diffusionmodules/model.py` (VAE),
`ldm/modules/encoders/modules.py` (FrozenCLIPEmbedder: a transformers CLIP under
`transformer.`; FrozenOpenCLIPEmbedder: an open_clip model under `model.`).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from sdlora.bases import families

StateDict = dict[str, torch.Tensor]
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model."


class CheckpointError(ValueError):
    """A state dict or checkpoint file is not in the layout we expected."""


def leftovers_error(kind: str, keys: Iterable[str], limit: int = 12) -> None:
    """Raise naming the keys no rule consumed (nothing if there are none)."""
    left = sorted(keys)
    if left:
        shown = ", ".join(left[:limit]) + (f", ... ({len(left) - limit} more)" if len(left) > limit else "")
        raise CheckpointError(f"{len(left)} {kind} key(s) match no known layout rule: {shown}")


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Copy of `sd` with `prefix` removed from the keys that have it."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


# ---------------------------------------------------------------- VAE
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # other ResnetBlock2D names are shared
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ATTN_INV = {v: k for k, v in _VAE_ATTN.items()}


def _vae_block_to_ldm(side: str, p: list[str], n_up: int) -> list[str] | None:
    """`down_blocks.i.resnets.j...` etc. (after `encoder.`/`decoder.`) -> LDM parts."""
    if p[:3] in (["mid_block", "resnets", "0"], ["mid_block", "resnets", "1"]):
        return ["mid", f"block_{int(p[2]) + 1}"] + [_VAE_RESNET.get(p[3], p[3])] + p[4:]
    if p[:3] == ["mid_block", "attentions", "0"]:
        n = 2 if p[3:5] == ["to_out", "0"] else 1
        name = _VAE_ATTN.get(".".join(p[3:3 + n]))
        return None if name is None else ["mid", "attn_1", name] + p[3 + n:]
    blocks = {"encoder": "down_blocks", "decoder": "up_blocks"}[side]
    if len(p) < 5 or p[0] != blocks or not p[1].isdigit():
        return None
    i = int(p[1]) if side == "encoder" else n_up - 1 - int(p[1])  # LDM numbers decoder.up bottom-up
    ldm_block = "down" if side == "encoder" else "up"
    if p[2] == "resnets":
        return [ldm_block, str(i), "block", p[3], _VAE_RESNET.get(p[4], p[4])] + p[5:]
    sampler = {"downsamplers": "downsample", "upsamplers": "upsample"}.get(p[2])
    return [ldm_block, str(i), sampler] + p[4:] if sampler and p[3] == "0" else None


def vae_to_ldm(sd: StateDict) -> StateDict:
    """diffusers AutoencoderKL state dict -> LDM keys without prefix (`encoder.mid.attn_1.q.weight`).

    Mid-block attention projections are Linear [C, C] in diffusers and 1x1 Conv
    [C, C, 1, 1] in LDM; they are reshaped (a view, no copy).
    """
    n_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    rest, out = dict(sd), {}
    for key in list(rest):
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = p
        elif p[0] in ("encoder", "decoder") and p[1] in ("conv_in", "conv_out", "conv_norm_out"):
            new = [p[0], "norm_out" if p[1] == "conv_norm_out" else p[1]] + p[2:]
        elif p[0] in ("encoder", "decoder"):
            tail = _vae_block_to_ldm(p[0], p[1:], n_up)
            new = None if tail is None else [p[0]] + tail
        else:
            new = None
        if new is not None:
            t = rest.pop(key)
            is_attn = "attn_1" in new and new[-1] == "weight" and new[-2] != "norm"
            out[".".join(new)] = t.reshape(*t.shape, 1, 1) if is_attn and t.ndim == 2 else t
    leftovers_error("diffusers VAE", rest)
    return out


def _vae_block_from_ldm(side: str, p: list[str], n_up: int) -> list[str] | None:
    if p[:2] in (["mid", "block_1"], ["mid", "block_2"]) and len(p) > 2:
        inv = {v: k for k, v in _VAE_RESNET.items()}
        return ["mid_block", "resnets", str(int(p[1][-1]) - 1), inv.get(p[2], p[2])] + p[3:]
    if p[:2] == ["mid", "attn_1"] and len(p) > 2:
        name = _VAE_ATTN_INV.get(p[2])
        return None if name is None else ["mid_block", "attentions", "0"] + name.split(".") + p[3:]
    ldm_block = "down" if side == "encoder" else "up"
    if len(p) < 4 or p[0] != ldm_block or not p[1].isdigit():
        return None
    i = int(p[1]) if side == "encoder" else n_up - 1 - int(p[1])
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    if p[2] == "block" and len(p) > 4:
        inv = {v: k for k, v in _VAE_RESNET.items()}
        return [blocks, str(i), "resnets", p[3], inv.get(p[4], p[4])] + p[5:]
    sampler = {"downsample": "downsamplers", "upsample": "upsamplers"}.get(p[2])
    return [blocks, str(i), sampler, "0"] + p[3:] if sampler else None


def vae_from_ldm(sd: StateDict, config: Mapping | None = None) -> StateDict:
    """LDM VAE keys (with or without `first_stage_model.`) -> diffusers AutoencoderKL keys.

    `config` (diffusers VAE config) gives the number of up blocks; without it
    the count is read from the keys.
    """
    rest, out = strip_prefix(sd, LDM_VAE_PREFIX), {}
    if config and "up_block_types" in config:
        n_up = len(config["up_block_types"])
    else:
        n_up = len({k.split(".")[2] for k in rest if k.startswith("decoder.up.")})
    for key in list(rest):
        p = key.split(".")
        if p[0] in ("quant_conv", "post_quant_conv"):
            new = p
        elif p[0] in ("encoder", "decoder") and p[1] in ("conv_in", "conv_out", "norm_out"):
            new = [p[0], "conv_norm_out" if p[1] == "norm_out" else p[1]] + p[2:]
        elif p[0] in ("encoder", "decoder"):
            tail = _vae_block_from_ldm(p[0], p[1:], n_up)
            new = None if tail is None else [p[0]] + tail
        else:
            new = None
        if new is not None:
            t = rest.pop(key)
            is_attn = "attentions" in new and new[-1] == "weight" and new[-2] != "group_norm"
            out[".".join(new)] = t.reshape(t.shape[0], t.shape[1]) if is_attn and t.ndim == 4 else t
    leftovers_error("original-SD VAE", rest)
    return out


# ---------------------------------------------------------------- text encoder
# transformers CLIPTextModel (after any `text_model.`) -> open_clip, relative to `model.`
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_TOP_INV = {v: k for k, v in _OPENCLIP_TOP.items()}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_LAYER_INV = {v: k for k, v in _OPENCLIP_LAYER.items()}
_QKV = ("q_proj", "k_proj", "v_proj")  # open_clip's fused in_proj stacks them in this order on dim 0
# Tensors the original checkpoints carry that no diffusers module holds: buffers
# rebuilt at load, and open_clip's contrastive head, unused by SD 2 (it conditions
# on the penultimate layer's output).
_TEXT_DROPPED = ("transformer.text_model.embeddings.position_ids", "transformer.embeddings.position_ids",
                 "model.attn_mask", "model.text_projection", "model.logit_scale")


def normalize_family(family: str) -> str:
    """The family ('sd1' / 'sd2') of any spelling the family table knows (sd15, sd21, sd2-base, ...)."""
    try:
        fam = families.family(family)
    except families.FamilyError as e:
        raise CheckpointError(str(e)) from None
    if not fam.loadable:
        raise CheckpointError(f"family={family!r}: {fam.title} single files are not supported yet")
    return fam.name


def text_encoder_to_ldm(sd: StateDict, family: str | None = None) -> StateDict:
    """transformers CLIPTextModel state dict -> LDM keys relative to `cond_stage_model.`.

    sd1: `transformer.text_model.<same path>`, plus the int64 `position_ids`
    buffer the original files carry. sd2: open_clip `model.*` with q/k/v fused
    into `attn.in_proj_weight` [3D, D]. Keys with or without a leading
    `text_model.` are accepted. `family=None` reads it from the width (768 / 1024).
    """
    rest = strip_prefix(sd, "text_model.")
    tok = rest.get("embeddings.token_embedding.weight")
    if family is None:
        width = None if tok is None else tok.shape[1]
        family = families.by_text_width(width)
        if family == families.UNKNOWN:
            raise CheckpointError(f"cannot tell SD 1 from SD 2 by text width {width}; pass family='sd1' or 'sd2'")
    if normalize_family(family) == "sd1":
        out = {"transformer.text_model." + k: rest.pop(k) for k in list(rest)}
        n_pos = out["transformer.text_model.embeddings.position_embedding.weight"].shape[0]
        out.setdefault("transformer.text_model.embeddings.position_ids", torch.arange(n_pos)[None])
        return out
    out = {}
    for key in list(rest):
        p = key.split(".")
        if key in _OPENCLIP_TOP:
            out["model." + _OPENCLIP_TOP[key]] = rest.pop(key)
        elif p[:2] == ["encoder", "layers"] and len(p) == 6 and p[3:5] == ["self_attn", "q_proj"]:
            parts = [f"encoder.layers.{p[2]}.self_attn.{q}.{p[5]}" for q in _QKV]
            if all(k in rest for k in parts):
                fused = torch.cat([rest.pop(k) for k in parts], dim=0)
                out[f"model.transformer.resblocks.{p[2]}.attn.in_proj_{p[5]}"] = fused
        elif p[:2] == ["encoder", "layers"] and len(p) >= 5:
            n = 2 if ".".join(p[3:5]) in _OPENCLIP_LAYER else 1
            name = _OPENCLIP_LAYER.get(".".join(p[3:3 + n]))
            if name is not None:
                out[".".join(["model.transformer.resblocks", p[2], name] + p[3 + n:])] = rest.pop(key)
    leftovers_error("text encoder (a k_proj/v_proj without its q/k/v partners?)", rest)
    return out


def text_encoder_from_ldm(sd: StateDict, config: Mapping | None = None, *,
                          text_model_prefix: str = "") -> StateDict:
    """LDM text-encoder keys (with or without `cond_stage_model.`) -> CLIPTextModel keys.

    The family is read from the keys (`transformer.` = SD 1, `model.` = SD 2).
    `config` (transformers CLIPTextConfig as a dict) sets how many layers to
    keep: SD 2 files hold 24 open_clip blocks, SD 2 uses 23 (diffusers' config
    has `num_hidden_layers=23`); the extra block is dropped, as are the tensors
    in `_TEXT_DROPPED`. `text_model_prefix` is prepended to every output key
    (transformers < 5 names CLIPTextModel weights `text_model.*`; 5 does not).
    """
    rest = strip_prefix(sd, LDM_TEXT_PREFIX)
    for key in _TEXT_DROPPED:
        rest.pop(key, None)
    keep = (config or {}).get("num_hidden_layers")
    out = {}
    for key in list(rest):
        converted = _text_key_from_ldm(key.split("."), rest[key], keep)
        if converted is not None:
            del rest[key]
            out.update(converted)
    leftovers_error("original-SD text encoder", rest)
    return {text_model_prefix + k: v for k, v in out.items()}


def _text_key_from_ldm(p: list[str], t: torch.Tensor, keep: int | None) -> StateDict | None:
    """One LDM text tensor -> {CLIPTextModel key: tensor} (3 entries for a fused
    in_proj, none for a block past `keep`); None if no rule fits."""
    if p[0] == "transformer" and len(p) > 1:
        return {".".join(p[2:] if p[1] == "text_model" else p[1:]): t}
    if p[0] == "model" and ".".join(p[1:]) in _OPENCLIP_TOP_INV:
        return {_OPENCLIP_TOP_INV[".".join(p[1:])]: t}
    if p[:3] != ["model", "transformer", "resblocks"] or len(p) < 6 or not p[3].isdigit():
        return None
    layer, p = p[3], p[4:]
    if keep is not None and int(layer) >= keep:
        return {}  # a block past the configured depth (SD 2's unused last block)
    if len(p) == 2 and p[0] == "attn" and p[1] in ("in_proj_weight", "in_proj_bias"):
        kind = p[1][len("in_proj_"):]
        # [3D, ...] -> 3 x [D, ...]; cloned so no two outputs share storage (safetensors refuses that)
        return {f"encoder.layers.{layer}.self_attn.{q}.{kind}": part.clone()
                for q, part in zip(_QKV, t.chunk(3, dim=0))}
    n = 2 if ".".join(p[:2]) in _OPENCLIP_LAYER_INV else 1
    name = _OPENCLIP_LAYER_INV.get(".".join(p[:n]))
    return None if name is None else {".".join(["encoder.layers", layer, name] + p[n:]): t}


# ---------------------------------------------------------------- SDXL's two text encoders
# Stability-AI/generative-models sd_xl_base.yaml: conditioner.embedders.0 = CLIP ViT-L (transformers layout,
# as SD 1.x's), conditioner.embedders.1 = OpenCLIP ViT-bigG (open_clip layout, as SD 2.x's, plus the
# text_projection SDXL's pooled vector goes through). open_clip computes pooled @ text_projection, a
# transformers Linear x @ W.T: the tensor is transposed between the two (diffusers' convert_open_clip_checkpoint
# and ComfyUI's clip_text_transformers_convert do the same; docs/SDXL.md).
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.")
_OPENCLIP_PROJECTION = "model.text_projection"


def sdxl_text_encoders_to_ldm(te1: StateDict, te2: StateDict) -> StateDict:
    """transformers CLIPTextModel (CLIP-L) + CLIPTextModelWithProjection (bigG) -> SGM keys, prefixes included."""
    te2 = strip_prefix(te2, "text_model.")
    projection = te2.pop("text_projection.weight", None)
    if projection is None:
        raise CheckpointError("SDXL's second text encoder has no text_projection.weight (a CLIPTextModelWithProjection "
                              "is needed)")
    out = {SDXL_TEXT_PREFIXES[0] + k: v for k, v in text_encoder_to_ldm(te1, "sd1").items()}
    out.update({SDXL_TEXT_PREFIXES[1] + k: v for k, v in text_encoder_to_ldm(te2, "sd2").items()})
    out[SDXL_TEXT_PREFIXES[1] + _OPENCLIP_PROJECTION] = projection.T.contiguous()
    return out


def sdxl_text_encoders_from_ldm(te1: StateDict, te2: StateDict, config2: Mapping | None = None, *,
                                text_model_prefix: str = "") -> tuple[StateDict, StateDict]:
    """SGM text-encoder keys (with their `conditioner.embedders.N.` prefixes) -> (CLIPTextModel keys,
    CLIPTextModelWithProjection keys); `text_model_prefix` as in text_encoder_from_ldm, for the first one."""
    one = text_encoder_from_ldm({"cond_stage_model." + k: v for k, v in strip_prefix(te1, SDXL_TEXT_PREFIXES[0]).items()},
                                text_model_prefix=text_model_prefix)
    rest = strip_prefix(te2, SDXL_TEXT_PREFIXES[1])
    projection = rest.pop(_OPENCLIP_PROJECTION, None)
    if projection is None:
        raise CheckpointError(f"no {SDXL_TEXT_PREFIXES[1]}{_OPENCLIP_PROJECTION}: not an SDXL base's text encoder")
    two = text_encoder_from_ldm({"cond_stage_model." + k: v for k, v in rest.items()}, config2,
                                text_model_prefix="text_model.")
    two["text_projection.weight"] = projection.T.contiguous()
    return one, two

