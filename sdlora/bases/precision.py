"""The precision a frozen base is kept in: fp32, bf16, fp16, or its linear layers quantised (int8, nf4).

QLoRA (Dettmers et al. 2023) keeps the frozen weights in 4-bit NormalFloat and trains full-precision
LoRA adapters on top; the adapters see the dequantised weight, so the update they learn is the same
kind of file. Here every ``nn.Linear`` of a model is swapped for bitsandbytes' ``Linear8bitLt`` (int8)
or ``Linear4bit`` (nf4) holding the same weights; convolutions, norms and embeddings are kept in a
16-bit dtype (``storage_dtype``), as QLoRA keeps what it does not quantise. bitsandbytes does the quantised arithmetic (on CUDA, and on CPU for these layers);
PEFT wraps the quantised layers with its own bitsandbytes LoRA layers when ``mark_quantized`` has
flagged the model (PEFT reads ``is_loaded_in_8bit`` / ``is_loaded_in_4bit`` on the model it adapts).
"""
from __future__ import annotations

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "int8", "nf4")
QUANTIZED = ("int8", "nf4")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INSTALL = "pip install bitsandbytes"


class PrecisionError(ValueError):
    """A base precision that cannot be had here."""


def bitsandbytes():
    """The bitsandbytes module, or a one-line error saying how to get it (never a silent fall-back)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise PrecisionError(f"an int8 or nf4 base needs bitsandbytes, which is not installed: run "
                             f"'{INSTALL}', or use base precision fp32, bf16 or fp16") from None
    return bnb


def storage_dtype(precision: str, compute: torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype the base's unquantised weights are kept in: fp32 / bf16 / fp16 as named; for int8 / nf4 a
    16-bit dtype, as QLoRA keeps everything it does not quantise: the compute dtype when that is 16-bit, else
    bf16 (fp16 on a GPU without bf16). SD's U-Net is 69% convolutions, which bitsandbytes does not quantise:
    in fp32 they would keep most of the memory a 4-bit base is for."""
    check(precision)
    if precision in DTYPES:
        return DTYPES[precision]
    if compute in (torch.float16, torch.bfloat16):
        return compute
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise PrecisionError(f"base precision {precision!r} is not allowed: use one of {', '.join(PRECISIONS)}")


def quantize(model: torch.nn.Module, precision: str, compute: torch.dtype = torch.float32,
             skip: tuple[str, ...] = (), device: str | torch.device | None = None) -> int:
    """Swap every nn.Linear of ``model`` (but those whose path ends with one of ``skip``) for a quantised
    layer with the same weights; returns how many were swapped. fp32/bf16/fp16 change nothing here.

    The new layers are quantised when moved to a device (``.to``), as bitsandbytes does it: on ``device``
    (default: where each weight was), one layer at a time, so a GPU never holds the full-precision model.
    """
    check(precision)
    if precision not in QUANTIZED:
        return 0
    bnb = bitsandbytes()
    swaps = [(name, m) for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and not any(name == s or name.endswith("." + s) for s in skip)]
    for name, linear in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(bnb, linear, precision, compute, device or linear.weight.device))
    mark_quantized(model, precision)
    return len(swaps)


def _quantized(bnb, linear: torch.nn.Linear, precision: str, compute: torch.dtype, device) -> torch.nn.Module:
    weight = linear.weight.detach().to("cpu", torch.float32 if compute == torch.float32 else compute)
    has_bias = linear.bias is not None
    if precision == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute,
                                  quant_type="nf4", device="meta")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                    has_fp16_weights=False, threshold=6.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = torch.nn.Parameter(linear.bias.detach().to("cpu", compute), requires_grad=False)
    # bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel on the first forward
    # without gradients; that fails on layers narrower than a quantisation block, and sampling during
    # training would then run on another layout than the training steps. One layout for both.
    layer.support_avx512bf16_for_cpu = False
    return layer.to(device)


def mark_quantized(model: torch.nn.Module, precision: str) -> None:
    """The flags PEFT reads to wrap quantised layers with its bitsandbytes LoRA layers."""
    model.is_loaded_in_4bit = precision == "nf4"
    model.is_loaded_in_8bit = precision == "int8"


def precision_of(model: torch.nn.Module) -> str:
    """'nf4' | 'int8' if the model holds quantised linear layers, else its first weight's dtype name."""
    for m in model.modules():
        kind = type(m).__name__
        if kind.startswith("Linear4bit"):
            return "nf4"
        if kind.startswith("Linear8bitLt"):
            return "int8"
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype))


def is_quantized(module: torch.nn.Module) -> bool:
    """A bitsandbytes layer (its .weight is packed: read its shape from in/out_features)."""
    return type(module).__name__.startswith(("Linear4bit", "Linear8bitLt"))


def weight_shape(module: torch.nn.Module) -> torch.Size:
    """A module's logical weight shape, also for quantised layers whose stored weight is packed."""
    if is_quantized(module):
        return torch.Size((module.out_features, module.in_features))
    return module.weight.shape


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor:
    """The full-precision weight of a linear layer, quantised or not (fp32)."""
    if not is_quantized(module):
        return module.weight.detach().float()
    bnb = bitsandbytes()
    w = module.weight
    if type(module).__name__.startswith("Linear4bit"):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return (w.data.float() * scb.float().reshape(-1, 1) / 127.0)


__all__ = ["PRECISIONS", "QUANTIZED", "PrecisionError", "quantize", "storage_dtype", "precision_of", "is_quantized",
           "weight_shape", "dequantized_weight", "mark_quantized", "bitsandbytes"]
