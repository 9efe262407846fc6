"""What a training run runs on, said in words: device, precision, attention kernel, optimizer, peak memory,
and, when memory runs out, which of the run's settings would lower it.

A silent fallback (an 8-bit optimizer that is not installed, attention on the
slow path, memory spilling) is what makes other trainers 10-100x slower without
saying so; the trainer prints `runtime_summary` when it starts and the peak
of its `PeakMemory` when it ends. The benchmarks (bench/) measure with the same class.
"""
from __future__ import annotations

import ctypes
import gc
import resource
from pathlib import Path

import torch

from sdlora.config import TrainConfig


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


def runtime_summary(device: torch.device, unet: torch.nn.Module, precision: str,
                    mixed_precision: str, optimizer: torch.optim.Optimizer, gradient_checkpointing: bool,
                    rest: torch.dtype | None = None) -> str:
    opt = f"{type(optimizer).__module__.split('.')[0]}.{type(optimizer).__name__}"
    quantized = ""
    if precision in ("int8", "nf4"):
        quantized = (f" (linear layers quantised by bitsandbytes, the rest "
                     f"{str(rest or torch.bfloat16).replace('torch.', '')}; adapters fp32)")
    return (f"device {device_name(device)}; base weights {precision}{quantized}, "
            f"mixed precision {mixed_precision}; attention {attention_kernel(unet, device)}; optimizer {opt}; "
            f"gradient checkpointing {'on' if gradient_checkpointing else 'off'}")


# Activation memory of a training step per U-Net parameter, at the base's native resolution, batch 1, fp32
# activations: measured on the SD 1.5 architecture at 512 px on CPU (bench/train_step.py: peak RSS minus the
# weights; README "Speed"), 2.3 bytes without gradient checkpointing and 1.3 with it. It scales with the pixels
# and the batch; 16-bit compute halves it. A rough guide, said as one.
ACTIVATION_BYTES_PER_PARAM = {False: 2.3, True: 1.3}


def _bytes_of(model: torch.nn.Module) -> int:
    """Memory a model's weights take as they are kept (quantised layers count their packed storage)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def memory_estimate(base, trainable: int, cfg: TrainConfig, resolution: int, precision: str,
                    device: torch.device) -> str:
    """One line before training: what the run's memory is made of, a rough total, and which of the memory options
    are on (so a user with an 8-16 GB GPU sees what to turn on before the run fails)."""
    weights = sum(_bytes_of(m) for m in base.models)
    eight_bit = cfg.use_8bit_adam and device.type == "cuda"
    optimizer = trainable * (4 + 4 + (2 if eight_bit else 8))       # weight, gradient, Adam's two moments
    unet_params = sum(p.numel() for p in base.unet.parameters())
    half = cfg.mixed_precision in ("fp16", "bf16") or precision in ("bf16", "fp16", "int8", "nf4")
    scale = (resolution / max(base.resolution, 1)) ** 2 * cfg.batch_size * (0.5 if half else 1.0)
    isolation = 2.0 if cfg.trigger_isolation > 0 else 1.0               # the batch runs twice through the U-Net
    activations = int(ACTIVATION_BYTES_PER_PARAM[cfg.gradient_checkpointing] * unet_params * scale * isolation)
    total = weights + optimizer + activations
    vae = str(base.vae.dtype).replace("torch.", "")
    return (f"memory estimate (rough): {format_bytes(total)} = weights {format_bytes(weights)} ({precision}) + "
            f"{trainable / 1e6:.1f}M trainable parameters with gradients and optimizer state "
            f"{format_bytes(optimizer)} + activations about {format_bytes(activations)} at {resolution} px, batch "
            f"{cfg.batch_size}. Memory options: gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
            f"mixed precision {cfg.mixed_precision}, base precision {precision}, 8-bit AdamW "
            f"{'on' if eight_bit else 'off'}, VAE {vae}")


class PeakMemory:
    """Peak memory between ``reset()`` and ``read()``, in bytes (GPU allocator, or process RSS on CPU).

    On CPU, ``reset`` first hands memory that glibc keeps after ``free`` back to the OS
    (``malloc_trim``), so RSS starts from what is live; without that, the previous step's
    freed activations would hide this step's peak. The benchmarks reset only before a
    warm-up step, so the trim never touches a timed one (unless --warmup 0); the trainer
    resets once per run, so a web UI's second run does not report its first run's peak.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "GPU max allocated" if device == "cuda" else "peak RSS"
        self._trim = None
        if device == "cpu":
            try:
                self._trim = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                self.kind += " (no malloc_trim: includes memory glibc kept after free)"
            if not self._can_reset():
                self.kind = "peak RSS since start (VmHWM reset refused)"

    @staticmethod
    def _can_reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _status_kib("VmHWM") is not None
        except OSError:
            return False

    def reset(self) -> None:
        if self.device == "cuda":
            import torch
            torch.cuda.reset_peak_memory_stats()
            return
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        if "refused" not in self.kind:
            Path("/proc/self/clear_refs").write_text("5")

    def read(self) -> int:
        if self.device == "cuda":
            import torch
            return torch.cuda.max_memory_allocated()
        kib = _status_kib("VmHWM") if "refused" not in self.kind else None
        return 1024 * (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    def now(self) -> int:
        """Memory in use right now (call after ``reset``: the floor a step's peak is measured against)."""
        if self.device == "cuda":
            import torch
            return torch.cuda.memory_allocated()
        return 1024 * (_status_kib("VmRSS") or 0)


def _status_kib(field: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_label(memory: PeakMemory) -> str:
    """What `memory.read()` measured, in words for the user."""
    if memory.device == "cuda":
        return "peak GPU memory allocated by torch"
    return "peak resident memory of the process" + (" since it started" if "refused" in memory.kind else "")


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def out_of_memory_advice(cfg: TrainConfig, resolution: int, run_dir: Path) -> str:
    """What to change when training ran out of memory, from the settings actually in use."""
    tips = []
    if cfg.batch_size > 1:
        tips.append(f"batch_size {cfg.batch_size} -> 1 (use grad_accum {cfg.grad_accum * cfg.batch_size} to keep the "
                    "effective batch)")
    if resolution > 512:
        tips.append(f"resolution {resolution} -> 512")
    elif resolution > 256:
        tips.append(f"resolution {resolution} -> {resolution // 2}")
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing on")
    if cfg.mixed_precision == "no" and torch.cuda.is_available():
        tips.append("mixed_precision bf16 or fp16")
    if not cfg.use_8bit_adam or not torch.cuda.is_available():
        tips.append("8-bit Adam (install bitsandbytes; CUDA only)")
    if cfg.base_precision not in ("int8", "nf4"):
        tips.append("base_precision nf4 (the frozen base in 4 bits; needs bitsandbytes)")
    tips.append("keep the text encoder frozen so its embeddings stay cached")
    return (f"out of memory while training in {run_dir}. Settings that lower memory: " + "; ".join(tips) +
            ". Start a new run with them (the checkpoints already in the run folder stay)")
