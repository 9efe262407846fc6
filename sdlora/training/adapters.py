"""Which modules to adapt, and LoRA injection for training through PEFT.

Training injects PEFT ``LoraConfig`` adapters (W + scale * B A with B = 0 at
start, base frozen) into exactly the modules ``target_names`` lists, and reads
them back as the canonical ``LoraSet`` of ``formats``. Generation applies LoRA
files with ``stack.LoraStack`` instead (drift-free strength changes, any number
of files, modules PEFT cannot express such as LoCon).

With ``adapter='adalora'`` the adapters are PEFT's AdaLoRA (Zhang et al. 2023):
W + (alpha' / r0) * B diag(E) A, every module starting at rank r0; ``AdaLoraSchedule``
calls PEFT's rank allocator after each optimizer step, which zeroes the least
important entries of E until the average rank is the target. ``extract`` keeps each
module's surviving ranks: down = (E * A)[kept], up = B[:, kept] with the module's scale
folded in, so that one alpha for every module gives the same update under every tool's
scale = alpha / rank: the file is an ordinary LoRA whose modules have their own ranks. On a quantised base (int8 / nf4,
``sdlora.bases.precision``) PEFT wraps the bitsandbytes layers with its own LoRA layers.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
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


def adalora_config(spec: LoraSpec, targets: list[str], total_steps: int) -> AdaLoraConfig:
    """PEFT's AdaLoRA config for a run of ``total_steps``: warm-up and final phases as shares of the steps.

    PEFT scales B diag(E) A by lora_alpha / r0 (r0 the starting rank); lora_alpha = alpha * r0 / rank makes
    that the plain LoRA's alpha / rank."""
    r0 = spec.init_rank
    final = max(1, round(spec.adalora_final * total_steps))      # masks still apply after the last step
    warmup = min(round(spec.adalora_warmup * total_steps), max(0, total_steps - final - 1))
    return AdaLoraConfig(target_r=spec.rank, init_r=r0, tinit=warmup, tfinal=final, deltaT=spec.adalora_interval,
                         total_step=total_steps, lora_alpha=spec.alpha * r0 / spec.rank, lora_dropout=spec.dropout,
                         target_modules=targets, init_lora_weights=True)


class Adapted(dict):
    """{component: adapted module paths}; ``adalora`` is the rank schedule when the adapter is AdaLoRA."""
    adalora: "AdaLoraSchedule | None" = None


def inject(unet: torch.nn.Module, text_encoders: torch.nn.Module | dict | None, spec: LoraSpec,
           total_steps: int | None = None) -> Adapted:
    """Add trainable adapters in place; returns the adapted module paths per component (AdaLoRA needs the
    run's ``total_steps`` for its schedule). ``text_encoders``: the CLIP text encoder, or {component: encoder}
    (SDXL's two, "text_encoder" and "text_encoder_2"); adapted when spec.text_encoder."""
    adapted = Adapted(unet=target_names(unet, spec.unet_targets()))
    if not adapted["unet"]:
        raise ValueError(f"no U-Net module matches the targets {spec.unet_targets()}; is this an SD U-Net?")
    models = {"unet": unet}
    if isinstance(text_encoders, torch.nn.Module):
        text_encoders = {"text_encoder": text_encoders}
    if spec.text_encoder:
        if not text_encoders:
            raise ValueError("text_encoder=True needs a text encoder")
        for component, te in text_encoders.items():
            adapted[component] = target_names(te, TEXT_ENCODER_ATTN)
            models[component] = te
    if spec.adapter == "adalora":
        if not total_steps:
            raise ValueError("AdaLoRA needs the run's total_steps for its rank schedule")
        from peft.tuners.adalora import AdaLoraModel
        adapted.adalora = AdaLoraSchedule({c: AdaLoraModel(m, adalora_config(spec, adapted[c], total_steps), ADAPTER)
                                           for c, m in models.items()})
    else:
        for c, m in models.items():
            inject_adapter_in_model(_config(spec, adapted[c]), m, adapter_name=ADAPTER)
    return adapted


def key_value_layers(unet: torch.nn.Module) -> list[tuple]:
    """(A weight, B weight, scale, the frozen base weight in fp32, DoRA's magnitude vector or None) of every LoRA
    on a cross-attention key or value projection (attn2.to_k / to_v): the adapters that read only the prompt."""
    from sdlora.bases.precision import dequantized_weight
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer) and name.endswith(("attn2.to_k", "attn2.to_v")) \
                and ADAPTER in getattr(module, "lora_A", {}):
            magnitude = getattr(module, "lora_magnitude_vector", {})
            out.append((module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, module.scaling[ADAPTER],
                        dequantized_weight(module.get_base_layer()),
                        magnitude[ADAPTER].weight if ADAPTER in magnitude else None))
    return out


class AdaLoraSchedule:
    """AdaLoRA's per-step work beside the optimizer: the orthogonality penalty on each loss, the rank
    re-allocation after each optimizer step, and its state for exact resume."""

    def __init__(self, tuners: dict):
        self.tuners = tuners                 # component -> peft AdaLoraModel (holding its RankAllocator)

    def penalty(self) -> torch.Tensor | float:
        """AdaLoRA's regulariser: the mean ||P P^T - I||_F over the A and B matrices, times orth_reg_weight."""
        total, n, weight = 0.0, 0, 0.0
        for tuner in self.tuners.values():
            weight = tuner.peft_config[ADAPTER].orth_reg_weight
            for name, p in tuner.model.named_parameters():
                if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
                    cov = p @ p.T if ".lora_A." in name else p.T @ p
                    total = total + torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=cov.device))
                    n += 1
        return weight * total / n if n else 0.0

    def after_step(self, step: int) -> None:
        """After the optimizer stepped, before the gradients are zeroed (the allocator reads them)."""
        for tuner in self.tuners.values():
            tuner.update_and_allocate(step)

    def state(self) -> dict:
        out = {}
        for c, tuner in self.tuners.items():
            alloc = tuner.rankallocator
            out[c] = {"ipt": dict(alloc.ipt), "exp_avg_ipt": dict(alloc.exp_avg_ipt),
                      "exp_avg_unc": dict(alloc.exp_avg_unc),
                      "rank_pattern": tuner.peft_config[ADAPTER].rank_pattern}
        return out

    def load_state(self, state: dict) -> None:
        for c, tuner in self.tuners.items():
            alloc, saved = tuner.rankallocator, state[c]
            alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = (dict(saved[k]) for k in
                                                               ("ipt", "exp_avg_ipt", "exp_avg_unc"))
            tuner.peft_config[ADAPTER].rank_pattern = saved["rank_pattern"]


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
    if spec.adapter == "adalora":
        return _extract_adalora(model, component, float(spec.rank))
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


def _extract_adalora(model: torch.nn.Module, component: str, alpha: float) -> LoraSet:
    """Each AdaLoRA module with the ranks that survived pruning (a module with none is left out).

    Every module gets the same `alpha` (the target rank), with the rest of its scale folded into `up`:
    (alpha / r_k) * up' @ down = (lora_alpha / r0) * B (E * A). One alpha for all modules, because diffusers
    applies one alpha to every module of a kohya file (its per-module names miss); A1111 and ComfyUI read each."""
    out: LoraSet = {}
    for path, layer in model.named_modules():
        if not (isinstance(layer, BaseTunerLayer) and hasattr(layer, "lora_E") and ADAPTER in layer.lora_E):
            continue
        a, e, b = (t[ADAPTER].detach().float().cpu() for t in (layer.lora_A, layer.lora_E, layer.lora_B))
        kept = e[:, 0] != 0
        rank = int(kept.sum())
        if rank == 0:
            continue
        scale = layer.scaling[ADAPTER] / (float(layer.ranknum[ADAPTER]) + 1e-5)
        out[f"{component}.{path}"] = LoraWeights(down=(a * e)[kept].clone(), up=b[:, kept] * (scale * rank / alpha),
                                                 alpha=alpha)
    return out


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (for checkpoints): PEFT's state dict, or AdaLoRA's A, E and B as they stand."""
    if _is_adalora(model):
        return {k: p.detach().cpu().clone() for k, p in model.named_parameters() if ".lora_" in k}
    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=ADAPTER).items()}


def _is_adalora(model: torch.nn.Module) -> bool:
    return any(hasattr(m, "lora_E") for m in model.modules() if isinstance(m, BaseTunerLayer))


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put checkpointed adapter tensors back, refusing any key that does not fit."""
    if _is_adalora(model):
        own = {k: p for k, p in model.named_parameters() if ".lora_" in k}
        if set(state) != set(own):
            raise ValueError(f"checkpoint's AdaLoRA keys differ from this model's: "
                             f"{sorted(set(state) ^ set(own))[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)
        return
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


__all__ = ["target_names", "inject", "Adapted", "AdaLoraSchedule", "adalora_config", "lora_parameters", "extract", "adapter_state", "load_adapter_state",
           "remove_adapters"]
