"""What a training run runs on, said in words: device, precision, attention kernel, optimizer, peak memory.

A silent fallback (an 8-bit optimizer that is not installed, attention on the
slow path, memory spilling) is what makes other trainers 10-100x slower without
saying so; the trainer prints `runtime_summary` when it starts and
`peak_memory` when it ends.
"""
from __future__ import annotations

import resource
import sys

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB)"
    n = torch.get_num_threads()
    return f"{device.type} ({n} thread{'s' * (n != 1)})"


def attention_kernel(unet: torch.nn.Module, device: torch.device) -> str:
    """The U-Net's attention processors by class, and which SDPA kernels torch may pick on this device."""
    names = sorted({type(p).__name__ for p in getattr(unet, "attn_processors", {}).values()})
    if not names:
        return "unknown"
    text = ", ".join(names)
    if any("2_0" in n for n in names):            # diffusers' processors on F.scaled_dot_product_attention
        if device.type == "cuda":
            kernels = [k for k, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                       ("memory-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                       ("math", torch.backends.cuda.math_sdp_enabled())) if on]
            text += f" (PyTorch scaled_dot_product_attention; kernels allowed: {', '.join(kernels)})"
        else:
            text += " (PyTorch scaled_dot_product_attention, CPU kernel)"
    return text


def runtime_summary(device: torch.device, unet: torch.nn.Module, weight_dtype: torch.dtype,
                    mixed_precision: str, optimizer: torch.optim.Optimizer, gradient_checkpointing: bool) -> str:
    opt = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
    return (f"device {device_name(device)}; base weights {str(weight_dtype).replace('torch.', '')}, "
            f"mixed precision {mixed_precision}; attention {attention_kernel(unet, device)}; optimizer {opt}; "
            f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): the CUDA allocator's peak since `reset_peak`, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "peak GPU memory allocated by torch"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "peak resident memory of the process"


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
