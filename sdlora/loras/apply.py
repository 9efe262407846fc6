"""Apply one or more LoRAs to a frozen base at chosen strengths, for generation.

Every consumer of a LoRA file applies ``W' = W + strength * (alpha / rank) * up @ down``
(A1111 ``extensions-builtin/Lora``, ComfyUI ``comfy/lora.py``, diffusers ``set_adapters``),
so a strength here means what it means there.

Two modes:
- unfused: a forward hook adds ``strength * scale * up(down(x))`` to the module's
  output; changing a strength only changes a number.
- fused: the module weight is rewritten to ``W0 + sum_i delta_i``, always computed
  from a saved copy of the original ``W0``; unfusing copies ``W0`` back. So no
  number of fuse / change / unfuse cycles can drift the base.
DoRA modules (``dora_scale``) are always applied to the weight, as ComfyUI does.
On a quantised base (int8 / nf4 linear layers) there is no weight to rewrite: every LoRA
is applied unfused, which gives the same images as fused up to the base's own rounding.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdlora.bases.precision import is_quantized, weight_shape
from sdlora.loras.layouts import LoraSet, LoraWeights


@dataclass
class Applied:
    """One LoRA in the stack with its strengths."""
    name: str
    loras: LoraSet
    unet_strength: float = 1.0
    te_strength: float = 1.0

    def strength(self, key: str) -> float:
        return self.unet_strength if key.startswith("unet.") else self.te_strength


def delta_weight(w: LoraWeights, weight_shape: torch.Size) -> torch.Tensor:
    """(alpha / rank) * up @ down, shaped like the module weight (fp32)."""
    up, down = w.up.float(), w.down.float()
    scale = w.alpha / w.rank
    if down.dim() == 2 and up.dim() == 2:
        return (scale * (up @ down)).reshape(weight_shape)
    # Conv: down [r, in, kh, kw], up [out, r, 1, 1] -> [out, in, kh, kw]
    d = (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return (scale * d).reshape(weight_shape)


def _dora(weight0: torch.Tensor, delta: torch.Tensor, w: LoraWeights, strength: float) -> torch.Tensor:
    """DoRA weight at a strength: normalise W0 + delta by its norm, rescale by dora_scale, lerp by strength."""
    calc = weight0 + delta
    mag = w.dora_scale.float()
    if mag.shape[0] == calc.shape[0] and mag.numel() == calc.shape[0]:      # per output row (PEFT)
        norm = calc.flatten(1).norm(dim=1).reshape(-1, *[1] * (calc.dim() - 1))
    else:                                                                   # per input column (kohya default)
        norm = calc.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (calc.dim() - 2))
    calc = calc * (mag.reshape(norm.shape) / norm)
    return strength * (calc - weight0)


class LoraStack:
    """Holds the base modules' original weights and the LoRAs applied to them."""

    def __init__(self, components: dict[str, torch.nn.Module]):
        self.components = components            # {"unet": unet, "text_encoder": te}
        self.lock = threading.RLock()            # held while the modules are changed or run
        self.owner: object = None                # who set the LoRAs last (Generators of one base share a stack)
        self.applied: list[Applied] = []
        self.fused = False
        self._orig: dict[str, torch.Tensor] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._modes: dict[str, str] = {}
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def module(self, key: str) -> torch.nn.Module:
        component, _, path = key.partition(".")
        return self.components[component].get_submodule(path)

    def set(self, applied: list[Applied], fused: bool | None = None) -> None:
        """Make exactly these LoRAs at these strengths active (cheap when only strengths change)."""
        for a in applied:
            self.check(a)
        self.applied = list(applied)
        if fused is not None:
            self.fused = fused
        self._refresh()

    def check(self, a: Applied) -> None:
        for key, w in a.loras.items():
            try:
                module = self.module(key)
                shape = weight_shape(module)
            except (AttributeError, KeyError):
                raise ValueError(f"LoRA '{a.name}': module {key} is not in this base model") from None
            if w.up.shape[0] != shape[0] or w.down.shape[1] != shape[1]:
                raise ValueError(f"LoRA '{a.name}': {key} is {w.down.shape[1]}->{w.up.shape[0]} but the base "
                                 f"module is {shape[1]}->{shape[0]}; the file is for another base")
            if w.dora_scale is not None and is_quantized(module):
                raise ValueError(f"LoRA '{a.name}' is DoRA, which rewrites the weight of {key}; this base's "
                                 "weights are quantised (int8/nf4). Load the base at fp32, bf16 or fp16 for it")

    def clear(self) -> None:
        self.set([])

    def _refresh(self) -> None:
        wanted = {k: self._mode(k) for a in self.applied for k in a.loras}
        self._cast.clear()                                 # per-device copies of the LoRA tensors
        if wanted != self._modes:                          # other modules or modes: start from W0
            for key in list(self._modes):
                self._restore(key)
            for key, mode in sorted(wanted.items()):
                if mode == "fuse":                         # hooks leave the weight alone: no copy needed
                    self._orig[key] = self.module(key).weight.detach().clone()
                else:
                    self._hooks[key] = self.module(key).register_forward_hook(self._hook(key))
            self._modes = wanted
        for key, mode in wanted.items():                   # hooks read self.applied; weights are recomputed
            if mode == "fuse":
                self._fuse(key)

    def _mode(self, key: str) -> str:
        dora = any(key in a.loras and a.loras[key].dora_scale is not None for a in self.applied)
        if is_quantized(self.module(key)):
            return "hook"
        return "fuse" if self.fused or dora else "hook"

    def _restore(self, key: str) -> None:
        if key in self._hooks:
            self._hooks.pop(key).remove()
        if key in self._orig:
            with torch.no_grad():
                self.module(key).weight.copy_(self._orig.pop(key))

    def _fuse(self, key: str) -> None:
        module = self.module(key)
        w0 = self._orig[key].float()
        total = torch.zeros_like(w0)
        for a in self.applied:
            w = a.loras.get(key)
            if w is None or a.strength(key) == 0:
                continue
            d = delta_weight(w, w0.shape).to(w0.device)
            total += _dora(w0, d, w, a.strength(key)) if w.dora_scale is not None else a.strength(key) * d
        with torch.no_grad():
            module.weight.copy_((w0 + total).to(module.weight.dtype))

    def _hook(self, key: str):
        def hook(module, inputs, output):
            x = inputs[0]
            for a in self.applied:
                w = a.loras.get(key)
                s = a.strength(key)
                if w is None or s == 0:
                    continue
                cache_key = (id(w), x.device, x.dtype)
                if cache_key not in self._cast:            # once per LoRA set, not once per forward
                    self._cast[cache_key] = (w.down.to(x.device, x.dtype), w.up.to(x.device, x.dtype))
                down, up = self._cast[cache_key]
                scale = s * w.alpha / w.rank
                if isinstance(module, torch.nn.Conv2d):
                    h = F.conv2d(x, down, stride=module.stride, padding=module.padding, dilation=module.dilation)
                    output = output + scale * F.conv2d(h, up)
                else:
                    output = output + scale * F.linear(F.linear(x, down), up)
            return output
        return hook


__all__ = ["Applied", "LoraStack", "delta_weight"]
