"""UNet key layout: diffusers `UNet2DConditionModel` <-> original SD (LDM `UNetModel`).

Pure functions on `dict[str, Tensor]`; the LDM keys here carry no
`model.diffusion_model.` prefix (`sdlora.bases.single_file` adds it). SD 1.x and 2.x differ
only in shapes (SD 2 uses linear `proj_in`/`proj_out`), never in names, so the
mapping is a renaming of module paths and the tensors pass through untouched.

The LDM UNet numbers its blocks flat (source: CompVis `openaimodel.py`):
  input_blocks.0                 conv_in
  input_blocks.{1+b*(L+1)+j}     down block b, layer j: .0 resnet, .1 attention
  input_blocks.{(b+1)*(L+1)}     down block b's downsampler (.0.op)
  middle_block.{0,1,2}           resnet, attention, resnet
  output_blocks.{b*(L+1)+j}      up block b, layer j (L+1 layers): .0 resnet,
                                 .1 attention, then the upsampler (.1 or .2 .conv)
  time_embed.{0,2} / out.{0,2} / label_emb.0.{0,2}
where L = layers_per_block (2 for SD 1.x/2.x and SDXL). SDXL's first level has no attention and its last
up level none either; `UnetLayout.up_attention` says which up blocks have them (the upsampler's slot).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from sdlora.bases.ldm_keys import CheckpointError, LDM_UNET_PREFIX, StateDict, leftovers_error, strip_prefix

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_RESNET_INV = {v: k for k, v in _RESNET.items()}
# top-level modules, diffusers -> LDM
_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
        "class_embedding": "label_emb",  # nn.Embedding when num_class_embeds is set
        # SDXL's pooled-text-and-size embedding (diffusers add_embedding, SGM label_emb.0)
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_TOP_INV = {v: k for k, v in _TOP.items() if not k.startswith("add_embedding.")}
_TOP_INV_XL = {**_TOP_INV, "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_MID = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1", "resnets.1": "middle_block.2"}
_MID_INV = {v: k for k, v in _MID.items()}


@dataclass(frozen=True)
class UnetLayout:
    """What the flat LDM numbering depends on."""
    layers_per_block: int = 2                  # L; resnets per down block (up blocks have L+1)
    up_attention: frozenset = frozenset({1, 2, 3})  # up blocks that have attentions (SD 1.x/2.x: all but 0)

    @classmethod
    def from_config(cls, config: Mapping) -> "UnetLayout":
        lpb = config.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise CheckpointError(f"layers_per_block={lpb!r}: only one int for all blocks is supported")
        ups = config.get("up_block_types", ())
        return cls(lpb, frozenset(i for i, t in enumerate(ups) if "CrossAttn" in t))

    @classmethod
    def from_diffusers_keys(cls, keys: Iterable[str]) -> "UnetLayout":
        keys = list(keys)
        resnets = {k.split(".")[3] for k in keys if k.startswith("down_blocks.0.resnets.")}
        ups = {int(k.split(".")[1]) for k in keys if k.startswith("up_blocks.") and ".attentions." in k}
        return cls(len(resnets) or 2, frozenset(ups))


def _rename_child(rest: list[str], table: dict[str, str]) -> list[str] | None:
    """Rename the first one or two path parts of `rest` by `table`; None if no entry fits."""
    for n in (2, 1):
        head = ".".join(rest[:n])
        if len(rest) >= n and head in table:
            return table[head].split(".") + rest[n:]
    return [] if not rest else None


def unet_path_to_ldm(path: str, layout: UnetLayout = UnetLayout()) -> str | None:
    """diffusers module or tensor path -> LDM path (no prefix); None if not a UNet path."""
    p = path.split(".")
    step = layout.layers_per_block + 1
    for n in (2, 1):
        if ".".join(p[:n]) in _TOP:
            return ".".join([_TOP[".".join(p[:n])]] + p[n:])
    if len(p) < 3 or not p[1].isdigit() and p[0] != "mid_block":
        return None
    if p[0] == "mid_block":
        ldm = _MID.get(".".join(p[1:3]))
        rest = _rename_child(p[3:], _RESNET) if p[1] == "resnets" else p[3:]
        return None if ldm is None or rest is None else ".".join([ldm] + rest)
    b, kind = int(p[1]), p[2]
    if kind == "downsamplers" and p[0] == "down_blocks" and p[3:5] == ["0", "conv"]:
        return ".".join([f"input_blocks.{(b + 1) * step}.0.op"] + p[5:])
    if kind == "upsamplers" and p[0] == "up_blocks" and p[3:5] == ["0", "conv"]:
        slot = 2 if b in layout.up_attention else 1
        return ".".join([f"output_blocks.{b * step + layout.layers_per_block}.{slot}.conv"] + p[5:])
    if kind not in ("resnets", "attentions") or len(p) < 4 or not p[3].isdigit():
        return None
    j = int(p[3])
    if p[0] == "down_blocks":
        block = f"input_blocks.{1 + b * step + j}"
    elif p[0] == "up_blocks":
        block = f"output_blocks.{b * step + j}"
    else:
        return None
    rest = _rename_child(p[4:], _RESNET) if kind == "resnets" else p[4:]
    return None if rest is None else ".".join([block, "0" if kind == "resnets" else "1"] + rest)


def unet_path_from_ldm(path: str, layers_per_block: int = 2, text_time: bool = False) -> str | None:
    """LDM path (no prefix) -> diffusers path; None if not an LDM UNet path. `text_time`: SDXL's U-Net, whose
    `label_emb.0` is diffusers' `add_embedding` (not `class_embedding`)."""
    p = path.split(".")
    step = layers_per_block + 1
    top = _TOP_INV_XL if text_time else _TOP_INV
    for n in (3, 2, 1):
        if ".".join(p[:n]) in top:
            return ".".join([top[".".join(p[:n])]] + p[n:])
    if p[0] == "middle_block" and len(p) > 1:
        mid = _MID_INV.get(".".join(p[:2]))
        rest = p[2:] if p[1] == "1" else _rename_child(p[2:], _RESNET_INV)
        return None if mid is None or rest is None else ".".join(["mid_block", mid] + rest)
    if len(p) < 3 or not p[1].isdigit() or not p[2].isdigit():
        return None
    i, slot, rest = int(p[1]), int(p[2]), p[3:]
    if p[0] == "input_blocks" and i > 0:
        b, j = divmod(i - 1, step)
        if j == layers_per_block:  # the downsampler: input_blocks.N.0.op
            ok = slot == 0 and rest[:1] == ["op"]
            return ".".join([f"down_blocks.{b}.downsamplers.0.conv"] + rest[1:]) if ok else None
        prefix = f"down_blocks.{b}"
    elif p[0] == "output_blocks":
        b, j = divmod(i, step)
        if slot in (1, 2) and rest[:1] == ["conv"]:  # the upsampler (attention blocks have no .conv)
            ok = j == layers_per_block
            return ".".join([f"up_blocks.{b}.upsamplers.0.conv"] + rest[1:]) if ok else None
        prefix = f"up_blocks.{b}"
    else:
        return None
    if slot == 0:
        rest = _rename_child(rest, _RESNET_INV)
        return None if rest is None else ".".join([prefix, "resnets", str(j)] + rest)
    return ".".join([prefix, "attentions", str(j)] + rest) if slot == 1 else None


def unet_to_ldm(sd: StateDict) -> StateDict:
    """diffusers UNet state dict -> LDM keys without prefix (`input_blocks.1.1.proj_in.weight`)."""
    layout = UnetLayout.from_diffusers_keys(sd)
    rest, out = dict(sd), {}
    for key in list(rest):
        new = unet_path_to_ldm(key, layout)
        if new is not None:
            out[new] = rest.pop(key)
    leftovers_error("diffusers UNet", rest)
    return out


def unet_from_ldm(sd: StateDict, config: Mapping | None = None) -> StateDict:
    """LDM UNet keys (with or without `model.diffusion_model.`) -> diffusers UNet keys.

    `config` is the diffusers UNet config; `layers_per_block` (default 2) and `addition_embed_type` are read.
    """
    lpb = UnetLayout.from_config(config or {}).layers_per_block
    text_time = (config or {}).get("addition_embed_type") == "text_time"
    rest, out = strip_prefix(sd, LDM_UNET_PREFIX), {}
    for key in list(rest):
        new = unet_path_from_ldm(key, lpb, text_time)
        if new is not None:
            out[new] = rest.pop(key)
    leftovers_error("original-SD UNet", rest)
    return out


def ldm_module_names(unet_module_names: Iterable[str], config: Mapping | None = None) -> dict[str, str]:
    """diffusers UNet module path -> A1111's underscore name of the same LDM module.

    `down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q` ->
    `diffusion_model_input_blocks_1_1_transformer_blocks_0_attn2_to_q` (the name
    A1111's Lora extension gives the module). `config` (diffusers UNet config)
    defaults to the SD 1.x/2.x layout. Raises naming any path it cannot map.
    """
    layout = UnetLayout.from_config(config) if config else UnetLayout()
    out, bad = {}, []
    for name in unet_module_names:
        ldm = unet_path_to_ldm(name, layout)
        if ldm is None:
            bad.append(name)
        else:
            out[name] = "diffusion_model_" + ldm.replace(".", "_")
    leftovers_error("UNet module path", bad)
    return out
