"""What one training step minimises: the denoising loss, plus trigger isolation, with Min-SNR weighting.

The target is the noise for epsilon-prediction bases and the velocity for v-prediction ones (SD 2.x
768), read from the base's scheduler config.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sdlora.config import TrainConfig
from sdlora.training import adapters
from sdlora.training.batches import Cond


# Text isolation's penalty per unit of trigger_isolation: the two methods' losses have different units (a relative
# squared change of key/value outputs; a squared prediction error), so one weight needs a conversion. Calibrated on
# the example styles (bench/style_quality.py on `tiny`): a factor of 1 let prompts without the trigger move up to
# 1.09x as far as with it (pastel, dusk 0.46x); 10 kept every style's statistics at or under 0.11x but pastel's
# palette (0.44x), and covered more of the way on neon and hatch.
TEXT_ISOLATION_SCALE = 10.0


class KeyValueIsolation:
    """Trigger isolation without a second U-Net pass: a penalty on what the cross-attention key/value adapters
    do to the prompts without the trigger.

    to_k and to_v of attn2 read only the text states, so if their adapters leave every token state of the
    untriggered captions (and of the empty caption) unchanged, the U-Net draws those prompts exactly as the
    frozen base does, guidance's empty prompt included. With S the (n, d) stack of those states and
    C = S^T S / n, a module whose output changes by D x (D an (out, d) matrix) changes them by a mean square of
    tr(D C D^T), against tr(W C W^T) for its base output W x: the penalty is the mean over the modules of their
    ratio (so its weight means the same on every base), from C computed once: a few small matmuls per step.
    For LoRA D = scale B A. For DoRA, whose magnitudes m rescale each output row to m / ||W + scale B A||
    (PEFT's, the norm taken as a constant), D = diag(g - 1) W + diag(g) scale B A with g that ratio: the
    magnitudes move every prompt's keys and values, so they are held too. Each term needs W only times
    (C A^T) or A^T, never an (out, d) product."""

    def __init__(self, layers: list, states: torch.Tensor):
        flat = states.reshape(-1, states.shape[-1]).float()
        c = flat.T @ flat / len(flat)                                # (d, d)
        self.second_moment = c
        self.layers = []
        for a, b, scale, w, magnitude in layers:
            base = (w @ c.to(w.device) * w).sum(dim=1)               # (W C W^T)_ii: each output's base energy
            energy = float(base.sum())
            # W (and the per-row figures) only where DoRA needs them: on a quantized or half-precision base `w`
            # is an fp32 copy, which plain LoRA's penalty has no use for once its energy is known
            dora = None if magnitude is None else (w, magnitude, base, (w * w).sum(dim=1))
            self.layers.append((a, b, scale, energy, dora))

    def penalty(self) -> torch.Tensor:
        total = 0.0
        for a, b, scale, energy, dora in self.layers:
            c = self.second_moment.to(a.device)
            a32, b32 = a.float(), b.float()
            lora = ((b32 @ (a32 @ c @ a32.T)) * b32).sum(dim=1)       # (B A C A^T B^T)_ii
            if dora is None:
                change = scale ** 2 * lora
            else:
                w, magnitude, base, row_norm2 = dora
                with torch.no_grad():                                # PEFT detaches the norm
                    norm2 = row_norm2 + 2 * scale * (b32 * (w @ a32.T)).sum(dim=1) \
                        + scale ** 2 * ((b32 @ (a32 @ a32.T)) * b32).sum(dim=1)
                g = magnitude.float() / norm2.clamp_min(1e-12).sqrt()
                cross = ((w @ (c @ a32.T)) * b32).sum(dim=1)          # (W C A^T B^T)_ii
                change = (g - 1) ** 2 * base + 2 * scale * (g - 1) * g * cross + scale ** 2 * g ** 2 * lora
            total = total + change.sum() / max(energy, 1e-12)
        return total / len(self.layers)


class Objective:
    """The loss of a batch, given the trainable U-Net and the frozen base's own (adapters off)."""

    def __init__(self, noise_scheduler, prediction_type: str, cfg: TrainConfig, weight_dtype: torch.dtype):
        self.sched, self.cfg, self.dtype = noise_scheduler, cfg, weight_dtype
        self.v = prediction_type == "v_prediction"

    def noisy(self, lat: torch.Tensor, g: torch.Generator):
        """(noisy latents, timesteps, target) for clean latents `lat`: DDPM add_noise at random timesteps."""
        noise = torch.randn(lat.shape, generator=g).to(lat.device)
        if self.cfg.noise_offset:
            offset = torch.randn(lat.shape[0], lat.shape[1], 1, 1, generator=g).to(lat.device)
            noise = noise + self.cfg.noise_offset * offset
        t = torch.randint(0, self.sched.config.num_train_timesteps, (lat.shape[0],), generator=g).to(lat.device)
        noisy = self.sched.add_noise(lat, noise, t).to(self.dtype)
        return noisy, t, self.sched.get_velocity(lat, noise, t) if self.v else noise

    def loss(self, unet, bare_unet, lat: torch.Tensor, cond: Cond, g: torch.Generator,
             plain: Callable[[], tuple[Cond, Cond, torch.Tensor | None]] | None = None,
             isolation_weight: float | None = None) -> torch.Tensor:
        """The denoising loss of a batch; with `plain` (gives the batch's captions without the trigger, through
        the LoRA and through the frozen base, and the clean latents to hold them on, None for the batch's own;
        called after the noise is drawn, so `g` is used in one order) plus trigger_isolation x the distance
        between the model's and the frozen base's predictions for them, on those latents noised to the batch's
        timesteps (the batch's own noisy latents when None). `bare_unet` is `unet` unwrapped from accelerate, so its adapters can be
        switched off."""
        noisy, t, target = self.noisy(lat, g)
        weight = self.cfg.trigger_isolation if isolation_weight is None else isolation_weight
        isolate = plain is not None and weight > 0
        if isolate:
            plain_lora, plain_base, plain_lat = plain()
            held = noisy
            if plain_lat is not None:           # the captions without the trigger on pictures of their own
                noise = torch.randn(plain_lat.shape, generator=g).to(lat.device)
                held = self.sched.add_noise(plain_lat, noise, t).to(self.dtype)
            with torch.no_grad(), adapters.adapters_off(bare_unet):
                frozen = bare_unet(held, t, **cond.with_text(plain_base).unet_kwargs(self.dtype)).sample.float()
            # one forward for both: the captions with the trigger, then without it
            both = Cond.cat([cond, cond.with_text(plain_lora)])
            pred = unet(torch.cat([noisy, held]), torch.cat([t, t]), **both.unet_kwargs(self.dtype)).sample.float()
            target = torch.cat([target, frozen])
        else:
            pred = unet(noisy, t, **cond.unet_kwargs(self.dtype)).sample.float()
        per = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            snr_weight = self.min_snr_weight(t, lat.device)
            per = per * (torch.cat([snr_weight, snr_weight]) if isolate else snr_weight)
        if isolate:
            main, kept = per.chunk(2)
            return main.mean() + weight * kept.mean()
        return per.mean()

    def min_snr_weight(self, t: torch.Tensor, device) -> torch.Tensor:
        """Min-SNR weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
        ac = self.sched.alphas_cumprod.to(device)[t]
        snr = ac / (1 - ac)
        return torch.clamp(snr, max=self.cfg.min_snr_gamma) / (snr + 1 if self.v else snr)


__all__ = ["Objective", "KeyValueIsolation", "TEXT_ISOLATION_SCALE"]
