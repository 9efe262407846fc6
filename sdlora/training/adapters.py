"""Which modules to adapt, and LoRA injection for training through PEFT.

Training injects PEFT ``LoraConfig`` adapters (W + scale * B A with B = 0 at
start, base frozen) into exactly the modules ``target_names`` lists, and reads
them back as the canonical ``LoraSet`` of ``formats``. Generation applies LoRA
files with ``stack.LoraStack`` instead (drift-free strength changes, any number
of files, modules PEFT cannot express such as LoCon).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer

from sdlora.config import TEXT_ENCODER_ATTN, LoraSpec
from sdlora.loras.layouts import LoraSet, LoraWeights

ADAPTER = "default"


def target_names(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Full dotted paths of the nn.Linear modules whose path ends with one of ``suffixes``."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            out.append(name)
    return sorted(out)


def _config(spec: LoraSpec, targets: list[str]) -> LoraConfig:
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      init_lora_weights=True, use_dora=spec.use_dora, use_rslora=spec.use_rslora)


def inject(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, spec: LoraSpec) -> dict[str, list[str]]:
    """Add trainable LoRA adapters in place; returns the adapted module paths per component."""
    adapted = {"unet": target_names(unet, spec.unet_targets())}
    if not adapted["unet"]:
        raise ValueError(f"no U-Net module matches the targets {spec.unet_targets()}; is this an SD U-Net?")
    inject_adapter_in_model(_config(spec, adapted["unet"]), unet, adapter_name=ADAPTER)
    if spec.text_encoder:
        if text_encoder is None:
            raise ValueError("text_encoder=True needs a text encoder")
        adapted["text_encoder"] = target_names(text_encoder, TEXT_ENCODER_ATTN)
        inject_adapter_in_model(_config(spec, adapted["text_encoder"]), text_encoder, adapter_name=ADAPTER)
    return adapted


@contextmanager
def adapters_off(*models: torch.nn.Module | None):
    """Run the frozen base: every PEFT adapter in ``models`` is bypassed inside the block."""
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The adapter parameters (lora_A, lora_B, DoRA magnitudes); everything else stays frozen."""
    params = []
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora:
            params.append(p)
    return params


def extract(model: torch.nn.Module, component: str, spec: LoraSpec) -> LoraSet:
    """Read trained adapters out of a PEFT-injected model as a canonical LoraSet.

    The alpha written is the one that gives the same update under the universal
    rule ``scale = alpha / rank``: for rank-stabilised LoRA (scale alpha/sqrt(r))
    that is ``alpha * sqrt(r)``.
    """
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    alpha = spec.file_alpha
    out: LoraSet = {}
    for key, value in sd.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        up = sd[path + ".lora_B.weight"]
        mag = sd.get(path + ".lora_magnitude_vector")
        out[f"{component}.{path}"] = LoraWeights(
            down=value.detach().float().cpu().clone(), up=up.detach().float().cpu().clone(), alpha=alpha,
            dora_scale=None if mag is None else mag.detach().float().cpu().reshape(-1, 1).clone())
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors (for checkpoints)."""
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put checkpointed adapter tensors back, refusing any key that does not fit."""
    from peft import set_peft_model_state_dict
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ValueError(f"checkpoint has adapter keys this model lacks: {unexpected[:5]}")


def remove_adapters(model: torch.nn.Module) -> None:
    """Take PEFT layers out again, leaving the original modules in place."""
    from diffusers.utils import recurse_remove_peft_layers
    recurse_remove_peft_layers(model)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                pass


__all__ = ["target_names", "inject", "lora_parameters", "extract", "adapter_state", "load_adapter_state",
           "remove_adapters"]
