"""The built-in base's training stages: the VAE, its decoder fine-tune, the latents, and the denoiser
(U-Net and text encoder together)."""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from sdlora.tinybase import scenes
from sdlora.tinybase.models import SD_SCHEDULE, BuildConfig, log, n_params, make_vae, make_text_encoder, make_unet
from sdlora.tinybase.words import WordIdentity, fix_free_words


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def warmup_constant(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def texture_loss(recon: torch.Tensor, x: torch.Tensor, radii: tuple[int, ...] = (1, 2, 4)) -> torch.Tensor:
    """L1 between the local texture energy of `recon` and of `x`: per 4x4 px cell (one latent cell), the mean
    |image - its local mean over 2r+1 px| at each radius. Phase-free, so a decoder that cannot place every
    grain of a texture is still asked to give back how much texture there is, and at which scale: L1 + MSE
    alone make it draw the average, a flat colour."""
    loss = recon.new_zeros(())
    for r in radii:
        energies = []
        for y in (recon, x):
            hp = y - F.avg_pool2d(F.pad(y, (r, r, r, r), mode="replicate"), 2 * r + 1, stride=1)
            energies.append(F.avg_pool2d(hp.abs(), 4))
        loss = loss + F.l1_loss(*energies)
    return loss


DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))     # (dy, dx): across, down, and both diagonals


def direction_loss(recon: torch.Tensor, x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """L1 between `recon`'s and `x`'s mean |change| over `step` px in four directions (across, down, both
    diagonals), per 4x4 px cell. Phase-free like texture_loss, but it tells lines from a texture without a
    direction: texture energy alone is met as well by a mush of the same strength, and was (a decoder trained
    on it gave back 13% of the direction of 45-degree lines 6 px apart)."""
    loss = recon.new_zeros(())
    h, w = x.shape[-2:]
    for dy, dx in DIRECTIONS:
        dy, dx = dy * step, dx * step
        energies = []
        for y in (recon, x):
            a = y[..., :h - dy, :w - dx] if dx >= 0 else y[..., :h - dy, -dx:]
            b = y[..., dy:, dx:] if dx >= 0 else y[..., dy:, :w + dx]
            energies.append(F.avg_pool2d((a - b).abs(), 4, ceil_mode=True))
        loss = loss + F.l1_loss(*energies)
    return loss


def line_images(n: int, seed: int) -> torch.Tensor:
    """(n, 3, 64, 64) in -1..1: dark lines (textures.hatch) at 0, 45, 90 or 135 degrees, 4-8 px apart, in any
    phase, over a light paper: what refine_decoder adds to the VAE images."""
    import random

    import numpy as np

    from sdlora.tinybase import textures
    rng, out = random.Random(seed), []
    for _ in range(n):
        paper = np.empty((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), dtype=np.float32)
        paper[:] = [rng.randint(120, 255) for _ in range(3)]
        lines = textures.hatch(scenes.IMAGE_SIZE, rng.choice((4, 5, 6, 7, 8)), angle=rng.choice((0.0, 45.0, 90.0, 135.0)),
                               phase=rng.random())
        out.append(textures.ink(paper, lines, tuple(rng.randint(0, 120) for _ in range(3)), rng.uniform(0.5, 1.0)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 127.5 - 1 if out else torch.zeros(0, 3, 64, 64)


def train_vae(cfg: BuildConfig, images: torch.Tensor) -> AutoencoderKL:
    """L1 + MSE reconstruction with SD's small KL term, plus the texture-energy term, on random crops."""
    vae = make_vae(cfg)
    with torch.no_grad():   # start the posterior narrow (std e^-3): the decoder sees clean latents from step 0
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    log(f"VAE {n_params(vae):.2f}M params, {cfg.vae_steps} steps x {cfg.vae_batch} crops of {cfg.vae_crop}px")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.vae_steps, 50))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    c, size = cfg.vae_crop, images.shape[-1]
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        oy, ox = torch.randint(0, size - c + 1, (2,), generator=gen).tolist()
        x = images[idx, :, oy:oy + c, ox:ox + c]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.kl_weight * post.kl().mean()
        if cfg.texture_weight:
            loss = loss + cfg.texture_weight * texture_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step:5d}  recon {rec.item():.4f}")
    return vae.eval().requires_grad_(False)


def finetune_decoder(cfg: BuildConfig, vae: AutoencoderKL, latents: tuple[torch.Tensor, torch.Tensor],
                     images: torch.Tensor, refine: bool = False) -> AutoencoderKL:
    """Train only the decoder on the cached latents, at a lower rate. The encoder is frozen, so the
    latents the U-Net learns are unchanged; this stage can run before or after the U-Net's. `refine`: the
    build's last stage (refine_decoder): cfg.refine_steps on whole images, with the direction loss."""
    mean, std = latents                                              # (N, 4, 16, 16), unscaled
    decoder = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in decoder:
        p.requires_grad_(True)
    steps = cfg.refine_steps if refine else cfg.decoder_steps
    opt = torch.optim.AdamW(decoder, lr=cfg.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, 20))
    gen = torch.Generator().manual_seed(cfg.seed + (8 if refine else 4))
    c = (scenes.IMAGE_SIZE if refine else cfg.vae_crop) // 4         # latent crop side
    for step in range(steps):
        idx = torch.randint(len(mean), (cfg.vae_batch,), generator=gen)
        oy, ox = torch.randint(0, mean.shape[-1] - c + 1, (2,), generator=gen).tolist()
        m, s = mean[idx, :, oy:oy + c, ox:ox + c], std[idx, :, oy:oy + c, ox:ox + c]
        z = m + s * torch.randn(m.shape, generator=gen)
        x = images[idx, :, 4 * oy:4 * (oy + c), 4 * ox:4 * (ox + c)]
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        if cfg.texture_weight:
            loss = loss + cfg.texture_weight * texture_loss(recon, x)
        if refine and cfg.direction_weight:
            loss = loss + cfg.direction_weight * direction_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder {'refine ' if refine else ''}step {step:5d}  recon {loss.item():.4f}")
    return vae.eval().requires_grad_(False)


def refine_decoder(cfg: BuildConfig, vae: AutoencoderKL, vae_images: torch.Tensor) -> AutoencoderKL:
    """The build's last VAE stage, after the U-Net (which reads only the encoder's latents, so is the same with
    or without it): the decoder alone once more, on the VAE images plus cfg.line_images of lines, whole images,
    with direction_loss beside the texture loss, so that lines come back as lines."""
    images = torch.cat([vae_images, line_images(cfg.line_images, cfg.seed + 7)])
    return finetune_decoder(cfg, vae, encode_latents(vae, images), images, refine=True)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (N, 4, 16, 16) of every image, computed once."""
    means, stds = [], []
    for chunk in images.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def check_vae(vae: AutoencoderKL, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """Reconstruction PSNR and how often the judge reads back the right colour and shape."""
    n = min(64, len(images))
    recon = vae.decode(mean[:n]).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, images[:n]).item()
    agree = 0
    for a, b in zip(to_pil(images[:n]), to_pil(recon)):
        agree += scenes.measure(a) == scenes.measure(b)
    return {"psnr_db": 10 * math.log10(4 / mse), "judge_agreement": agree / n}


@torch.no_grad()
def _share_kept(vae: AutoencoderKL, coverages: list, measure) -> float:
    """measure(image) after a VAE round trip (encode mean, decode) over measure(image) before, in the mean over
    images of dark ink laid over cream where each coverage map (64, 64) says."""
    import numpy as np

    from sdlora.tinybase import textures
    ims = []
    for coverage in coverages:
        paper = np.empty((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE, 3), dtype=np.float32)
        paper[:] = (240, 230, 205)
        ims.append(textures.ink(paper, coverage, (40, 30, 30), 0.8))
    x = torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2) / 127.5 - 1
    back = vae.decode(vae.encode(x).latent_dist.mean).sample
    before = np.mean([measure(im) for im in to_pil(x)])
    after = np.mean([measure(im) for im in to_pil(back)])
    return round(float(after / before), 3)


def texture_round_trip(vae: AutoencoderKL, n: int = 8, seed: int = 99) -> dict[str, dict[str, float]]:
    """{kind: {scale px: share of texture energy kept}} after a VAE round trip (encode mean, decode), for each
    texture of sdlora.tinybase.textures in dark ink over cream, n images each; 1 = all kept, 0 = flattened.
    The energy is read at a radius that suits the scale (1 px up to 3 px, 2 px up to 6, 4 px above)."""
    import random

    from sdlora.tinybase import textures
    rng, out = random.Random(seed), {}
    for kind in textures.KINDS:
        out[kind] = {}
        for scale in textures.SCALES:
            r = 1 if scale <= 3 else 2 if scale <= 6 else 4
            coverages = [textures.pattern(kind, scenes.IMAGE_SIZE, scale, rng) for _ in range(n)]
            out[kind][str(scale)] = _share_kept(vae, coverages, lambda im: textures.texture_energy(im, r))
    return out


LINE_ANGLES = (0, 45)             # lines_round_trip: vertical and diagonal
LINE_PERIODS = (6, 8)             # px


@torch.no_grad()
def lines_round_trip(vae: AutoencoderKL, n: int = 4) -> dict[str, dict[str, float]]:
    """{angle: {period px: share of the lines' directional contrast kept}} after a VAE round trip, for dark lines
    (textures.hatch, 45% of the period wide) over cream at n phases each: texture energy counts what comes back
    without its direction (a checkerboard of the same energy), textures.line_contrast only what keeps it."""
    from sdlora.tinybase import textures
    out = {}
    for angle in LINE_ANGLES:
        out[str(angle)] = {}
        for period in LINE_PERIODS:
            coverages = [textures.hatch(scenes.IMAGE_SIZE, period, angle=angle, phase=i / n) for i in range(n)]
            out[str(angle)][str(period)] = _share_kept(vae, coverages, lambda im: textures.line_contrast(im, angle))
    return out


@torch.no_grad()
def vae_round_trip(vae: AutoencoderKL, images: list) -> list:
    """Each RGB image encoded (posterior mean) and decoded by `vae`: what a base can give back of it."""
    import numpy as np
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1
    x = x.to(vae.device, vae.dtype)
    return to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu())


def to_pil(x: torch.Tensor) -> list:
    from PIL import Image
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


class EMA:
    """Exponential moving average of a module's parameters, with the usual warm-up of the decay."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.shadow = copy.deepcopy(module).requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow.parameters(), module.parameters()):
            s.lerp_(p, 1 - d)


def train_denoiser(cfg, latents, ids, empty_ids, t_start: float,
                   tokenizer: CLIPTokenizer) -> tuple[UNet2DConditionModel, CLIPTextModel, int]:
    """U-Net + text encoder, epsilon prediction under SD's schedule, 10% empty captions."""
    torch.manual_seed(cfg.seed + 2)
    unet, text_encoder = make_unet(cfg), make_text_encoder(cfg)
    embedding = fix_free_words(cfg, text_encoder, tokenizer) if cfg.prefix_meaning else None
    log(f"U-Net {n_params(unet):.2f}M params, text encoder {n_params(text_encoder):.2f}M params; "
        f"{cfg.unet_steps} steps x batch {cfg.batch}")
    noise_sched = DDPMScheduler(**SD_SCHEDULE)
    snr = noise_sched.alphas_cumprod / (1 - noise_sched.alphas_cumprod)
    snr_weight = snr.clamp(max=cfg.min_snr_gamma) / snr if cfg.min_snr_gamma else None   # epsilon target
    params = list(unet.parameters()) + list(text_encoder.parameters())
    identity = WordIdentity(text_encoder.config, cfg.identity_candidates) if cfg.identity_weight else None
    if identity is not None:
        params += list(identity.parameters())
    # with the read-back, the U-Net and the text side are clipped apart: its gradient must not shrink the U-Net's steps
    clip_groups = [params] if identity is None else \
        [list(unet.parameters()), list(text_encoder.parameters()) + list(identity.parameters())]
    # the fixed embeddings must not decay either: the embedding table gets no weight decay
    decayed = [p for p in params if p is not embedding]
    groups = [{"params": decayed}] + ([{"params": [embedding], "weight_decay": 0.0}] if embedding is not None else [])
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_constant(s, cfg.warmup))
    ema_u, ema_t = EMA(unet, cfg.ema_decay), EMA(text_encoder, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    mean, std = latents
    t0, running, read_back = time.time(), None, None
    for step in range(cfg.unet_steps):
        idx = torch.randint(len(mean), (cfg.batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)       # (B, 4, 16, 16), scaled
        variant = torch.randint(ids.shape[1], (cfg.batch,), generator=gen)
        tok = ids[idx, variant]                                                        # (B, 77)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.empty_caption_p
        tok = torch.where(drop[:, None], empty_ids[None], tok)
        noise = torch.randn(z.shape, generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn(z.shape[0], z.shape[1], 1, 1, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch,), generator=gen)
        cond = text_encoder(tok)[0]                                                    # (B, 77, hidden)
        pred = unet(noise_sched.add_noise(z, noise, t), t, cond).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean((1, 2, 3))
        loss = (snr_weight[t] * per_sample).mean() if cfg.min_snr_gamma else per_sample.mean()
        total = loss
        if identity is not None:
            id_loss, acc = identity(cond, tok, text_encoder.get_input_embeddings().weight, gen)
            total = loss + cfg.identity_weight * id_loss
            if not math.isnan(acc):
                read_back = acc if read_back is None else 0.98 * read_back + 0.02 * acc
        opt.zero_grad(set_to_none=True)
        total.backward()
        for group in clip_groups:
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        opt.step()
        sched.step()
        ema_u.update(unet)
        ema_t.update(text_encoder)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            rate = (time.time() - t0) / (step + 1)
            words = f"  words read back {read_back:.0%}" if read_back is not None else ""
            log(f"unet step {step:5d}  loss {running:.4f}{words}  {rate:.2f}s/step  eta {rate * (cfg.unet_steps - step - 1) / 60:.1f} min")
        if cfg.max_minutes and time.time() - t_start > 60 * cfg.max_minutes:
            log(f"time budget of {cfg.max_minutes} min reached: stopping after {step + 1} steps "
                f"(--unet-steps {step + 1} reproduces this model)")
            break
    return ema_u.shadow.eval(), ema_t.shadow.eval(), step + 1
