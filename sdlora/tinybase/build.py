"""Build the built-in `tiny` base model: a real, small Stable Diffusion trained from scratch.

`python -m sdlora.tinybase build [--out DIR] [--quick]` draws the procedural
scenes of `sdlora.tinybase.scenes`, trains an `AutoencoderKL`, then a cross-attention
`UNet2DConditionModel` together with a `CLIPTextModel` (SD 1.5's tokenizer),
and saves a diffusers `StableDiffusionPipeline` folder (default
`sdlora/base_model/`). It is trained as SD was: scaled-linear betas
0.00085-0.012 over 1000 steps, epsilon prediction, VAE latents scaled to unit
spread, 10% empty captions for classifier-free guidance. Seeds are fixed and
figures are printed as it goes; `evaluate` is the quality bar the tests use.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.tinybase import scenes
from sdlora.tinybase.card import evaluate, write_model_card

PACKAGE = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PACKAGE / "base_model"
TOKENIZER_DIR = PACKAGE / "assets" / "clip_tokenizer"
# SD 1.x's training noise schedule (CompVis v1-inference.yaml: linear_start/end, timesteps).
CLIP_VOCAB = 49408    # SD 1.5's tokenizer
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", prediction_type="epsilon")


@dataclass
class BuildConfig:
    """Everything the build depends on; saved beside the model as build.json."""
    seed: int = 0                       # one seed for scenes, init, noise and sampling
    threads: int = 1                    # torch CPU threads (2 gives ~15% on a 2-core CPU)
    n_images: int = 4000                # procedural training scenes (latents cached once)
    empty_caption_p: float = 0.1        # share of captions dropped to "" (for CFG), as SD
    # Caption variety, so that a prompt need not be one of the templates: per scene, this many more
    # captions that leave the background out (it is then the model's choice) or put a made-up word
    # in front ("glowbird, a red circle ..."), the way a LoRA's trigger is put in front.
    free_captions: int = 4
    no_background_p: float = 0.5
    prefix_p: float = 0.5
    # Two looks, as SD knows both paintings and line art: this share of scenes is drawn as an outline,
    # named in the caption ("a red circle outline") except in no_look_p of the free captions.
    # 0 draws exactly the scenes of the bases before outlines; the neon style's outlines need 0.4.
    outline_p: float = 0.4
    no_look_p: float = 0.5
    # Words the captions never use (a LoRA's trigger among them) keep a fixed random embedding of
    # norm free_word_norm instead of an untrained one near zero, and a made-up word in front carries
    # meaning: the scene's size, told by which of three fixed directions its embedding leans to. Meant
    # to make the U-Net read a word in front instead of skipping it, so a LoRA can tie a style to its
    # trigger; at norms 0.4 and 8 the model did not learn the meaning (tests/test_tinybase.py checks it).
    prefix_meaning: bool = False
    free_word_norm: float = 0.4
    # Word identity: a second loss on the text encoder, weighted by this, that reads each word's token
    # back from its output state and the caption's words from the end-of-text state (see WordIdentity).
    # Trained on denoising alone, the encoder gives every word it was not taught (a trigger among them)
    # nearly the same state, so a LoRA on the U-Net cannot tell a prompt with the trigger from one
    # without it (neon at LoRA defaults: 0.97-1.00x the change without the trigger as with it; weight
    # 0.1: 0.00x / 0.49x (fill ratio / background); weight 1: 0.07x / 0.10x). 0 trains on denoising alone.
    identity_weight: float = 1.0
    identity_candidates: int = 512      # random vocabulary tokens each step's read-back chooses among
    # Offset noise (a per-channel constant in the noise, as SDXL's training used): SD's schedule
    # leaves ~7% of the image at t=999, so without it the model reads an image's mean brightness
    # from the noise instead of learning it from the caption, and cannot make an image darker or
    # lighter than its start; fine-tunes then cannot teach a dark style.
    noise_offset: float = 0.2
    vae_channels: tuple = (32, 64, 64)  # 2 downsamples: 64 px -> 16x16x4 latents
    vae_colour_images: int = 4000       # extra arbitrary-colour images for the VAE (keeps chroma in latents)
    vae_outline_p: float = 0.5          # share of those drawn as outlines (thin lines keep their hue)
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_crop: int = 32                  # VAE trains on random crops (it is fully convolutional)
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6             # SD's KL weight for its f=8 KL-autoencoder
    decoder_steps: int = 600            # then the decoder alone, encoder frozen
    decoder_lr: float = 3e-4
    text_hidden: int = 64               # CLIP text width = U-Net cross_attention_dim
    text_layers: int = 2
    unet_channels: tuple = (32, 64, 128)  # at 16x16, 8x8 and 4x4 latents
    # Cross-attention per level. SD attends at its three high-resolution levels; here 16x16 attention
    # costs 1.5x per step, and with it (True, True, False) drew the prompt's shape in 17% of held-out
    # images after the 2,239 steps that fit the time budget (colour 92%), against 94% for this layout.
    unet_cross_attention: tuple = (False, True, True)
    unet_steps: int = 3575              # what fitted in 56 minutes with a second build on the other core
    batch: int = 32
    min_snr_gamma: float = 5.0          # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    lr: float = 1e-3                    # constant after warm-up; the EMA does the annealing, so
    warmup: int = 100                   # a run stopped at step k equals a run of k steps
    ema_decay: float = 0.998
    max_minutes: float = 0.0            # >0: stop U-Net training once the build has run this long
    sample_steps: int = 20              # DPM-Solver++ steps recommended for sampling
    guidance: float = 5.0               # recommended classifier-free guidance scale
    lora_lr: float = 1e-3               # recommended LoRA learning rate (trainers read it from build.json);
                                        # tests/test_style_learning.py measured 1e-4 to move a style 5% of the way

    @classmethod
    def quick(cls) -> "BuildConfig":
        """A few-minute end-to-end check; the model it makes is not usable."""
        return cls(n_images=600, vae_colour_images=600, vae_steps=60, decoder_steps=60, unet_steps=60, warmup=20)


def log(msg: str) -> None:
    print(f"[tinybase {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


# ---- models -----------------------------------------------------------------

def make_vae(cfg: BuildConfig) -> AutoencoderKL:
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         block_out_channels=cfg.vae_channels, norm_num_groups=16,
                         sample_size=scenes.IMAGE_SIZE)


def make_text_encoder(cfg: BuildConfig) -> CLIPTextModel:
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=cfg.text_hidden, intermediate_size=4 * cfg.text_hidden,
                            num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
                            projection_dim=cfg.text_hidden, hidden_act="quick_gelu",
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(config)


def make_unet(cfg: BuildConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=scenes.IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, norm_num_groups=16, attention_head_dim=8,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_cross_attention)),
        cross_attention_dim=cfg.text_hidden)


# ---- data ---------------------------------------------------------------------

def caption_words(outlines: bool = True) -> set[str]:
    """Every word of the scenes' captions ('outline' only when the build draws outlines)."""
    return {w for phrase in [*scenes.COLOURS, *scenes.SHAPES, *scenes.SIZES, *scenes.POSITIONS,
                             *scenes.BACKGROUNDS, "a on background and", "outline" * outlines]
            for w in phrase.split()}


def made_up_word_parts(tokenizer: CLIPTokenizer, outlines: bool = True) -> list[str]:
    """Whole-word vocabulary entries (3-8 ascii letters) that are not words of the scenes' captions."""
    scene_words = caption_words(outlines)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [t[:-4] for t, _ in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()
            and 3 <= len(t) - 4 <= 8 and t[:-4] not in scene_words]


def caption_token_ids(tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Ids of every token the scenes' captions use (and the special tokens)."""
    ids = {i for w in [*caption_words(), ","] for i in tokenizer(w).input_ids}
    return torch.tensor(sorted(ids))


def free_word_embeddings(cfg: BuildConfig, tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab, hidden) fixed random embeddings of norm ~free_word_norm for the words no caption uses,
    and (3, hidden) unit directions, one per size word, that a made-up word's meaning is read along."""
    g = torch.Generator().manual_seed(cfg.seed + 7)
    table = torch.randn(CLIP_VOCAB, cfg.text_hidden, generator=g)
    table = table * cfg.free_word_norm / math.sqrt(cfg.text_hidden)
    directions = F.normalize(torch.randn(len(scenes.SIZES), cfg.text_hidden, generator=g), dim=1)
    return table, directions


class WordMeaning:
    """Which size a made-up word means: the size direction its tokens' mean embedding leans to most."""

    def __init__(self, cfg: BuildConfig, tokenizer: CLIPTokenizer):
        self.table, self.directions = free_word_embeddings(cfg, tokenizer)
        self.tokenizer = tokenizer

    def size(self, word: str) -> str:
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        return list(scenes.SIZES)[int((self.table[ids].mean(0) @ self.directions.T).argmax())]


def free_caption(scene: scenes.Scene, rng: random.Random, parts: list[str], cfg: BuildConfig,
                 meaning: WordMeaning | None = None) -> str:
    caption = scene.caption(rng.random() > 0.25, rng.random() > 0.25, rng.random() >= cfg.no_background_p,
                            scene.look == "filled" or rng.random() >= cfg.no_look_p)
    if rng.random() < cfg.prefix_p:
        while True:      # a word that means the scene's size
            word = "".join(rng.choice(parts) for _ in range(rng.choice((1, 2))))
            if meaning is None or meaning.size(word) == scene.size:
                break
        caption = f"{word}, {caption}"
    return caption


def make_dataset(cfg: BuildConfig, tokenizer: CLIPTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 64, 64) in [-1, 1] and token ids (N, 4 + free_captions, 77): caption variants per scene."""
    rng = random.Random(cfg.seed)
    caption_rng = random.Random(cfg.seed + 6)      # its own stream: free_captions=0 draws the same scenes as before
    parts = made_up_word_parts(tokenizer, outlines=cfg.outline_p > 0) if cfg.free_captions else []
    meaning = WordMeaning(cfg, tokenizer) if cfg.prefix_meaning else None
    images, captions = [], []
    for _ in range(cfg.n_images):
        scene = scenes.random_scene(rng, outline_p=cfg.outline_p)
        images.append(np.asarray(scenes.render(scene)))
        captions += [scene.caption(s, p) for s in (True, False) for p in (True, False)]
        captions += [free_caption(scene, caption_rng, parts, cfg, meaning) for _ in range(cfg.free_captions)]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    ids = tokenize(tokenizer, captions).view(cfg.n_images, 4 + cfg.free_captions, -1)
    return x, ids


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """(len(texts), 77) ids, padded and truncated as StableDiffusionPipeline does."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


# ---- training -------------------------------------------------------------------

def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def warmup_constant(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup)


def train_vae(cfg: BuildConfig, images: torch.Tensor) -> AutoencoderKL:
    """L1 + MSE reconstruction with SD's small KL term, on random crops."""
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step:5d}  recon {rec.item():.4f}")
    return vae.eval().requires_grad_(False)


def finetune_decoder(cfg: BuildConfig, vae: AutoencoderKL, latents: tuple[torch.Tensor, torch.Tensor],
                     images: torch.Tensor) -> AutoencoderKL:
    """Train only the decoder on the cached latents, at a lower rate. The encoder is frozen, so the
    latents the U-Net learns are unchanged; this stage can run before or after the U-Net's."""
    mean, std = latents                                              # (N, 4, 16, 16), unscaled
    decoder = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=cfg.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg.decoder_steps, 20))
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    c = cfg.vae_crop // 4                                            # latent crop side
    for step in range(cfg.decoder_steps):
        idx = torch.randint(len(mean), (cfg.vae_batch,), generator=gen)
        oy, ox = torch.randint(0, mean.shape[-1] - c + 1, (2,), generator=gen).tolist()
        m, s = mean[idx, :, oy:oy + c, ox:ox + c], std[idx, :, oy:oy + c, ox:ox + c]
        z = m + s * torch.randn(m.shape, generator=gen)
        x = images[idx, :, 4 * oy:4 * (oy + c), 4 * ox:4 * (ox + c)]
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg.decoder_steps - 1:
            log(f"decoder step {step:5d}  recon {loss.item():.4f}")
    return vae.eval().requires_grad_(False)


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


class WordIdentity(torch.nn.Module):
    """Reads tokens back from a text encoder's output states: each word's token from its own state,
    and the caption's bag of words from its first end-of-text state. Scores are cosines (x `scale`)
    to the encoder's own input embeddings of the words in the batch plus random vocabulary tokens,
    so the read-back covers every token, not only the captions' words. Used only while building."""

    def __init__(self, config: CLIPTextConfig, candidates: int, scale: float = 10.0):
        super().__init__()
        hidden = config.hidden_size
        self.token = torch.nn.Linear(hidden, hidden, bias=False)
        self.bag = torch.nn.Linear(hidden, hidden, bias=False)
        self.bos, self.eos = config.bos_token_id, config.eos_token_id
        self.candidates, self.scale = candidates, scale

    def forward(self, states: torch.Tensor, tok: torch.Tensor, embedding: torch.Tensor,
                gen: torch.Generator) -> tuple[torch.Tensor, float]:
        """(loss, share of words read back right); states (B, 77, H), tok (B, 77)."""
        words = (tok != self.bos) & (tok != self.eos)
        rows = words.any(1)
        if not rows.any():
            return states.sum() * 0.0, float("nan")
        cand = torch.unique(torch.cat([tok[words], torch.randint(len(embedding), (self.candidates,), generator=gen)]))
        keys = F.normalize(embedding[cand].detach(), dim=1)                        # (C, H)
        logits = self.scale * F.normalize(self.token(states[words]), dim=1) @ keys.T
        target = torch.searchsorted(cand, tok[words])
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(1) == target).float().mean().item()
        eos = (tok == self.eos).int().argmax(1)                                    # first end-of-text
        bag_logits = self.scale * F.normalize(self.bag(states[torch.arange(len(tok)), eos][rows]), dim=1) @ keys.T
        bag = torch.zeros_like(bag_logits)
        hits = words[rows]
        bag[hits.nonzero()[:, 0], torch.searchsorted(cand, tok[rows][hits])] = 1.0
        bag = bag / bag.sum(1, keepdim=True)
        loss = loss - (bag * bag_logits.log_softmax(1)).sum(1).mean()
        return loss, acc


def fix_free_words(cfg: BuildConfig, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Give every token the captions do not use its fixed random embedding, and keep it there in
    training (its gradient is zeroed); returns the token embedding table."""
    table, _ = free_word_embeddings(cfg, tokenizer)
    weight = text_encoder.get_input_embeddings().weight
    free = torch.ones(len(weight), dtype=torch.bool)
    free[caption_token_ids(tokenizer)] = False
    with torch.no_grad():
        weight[free] = table[free]
    weight.register_hook(lambda grad: grad.masked_fill(free[:, None], 0.0))
    return weight


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


# ---- saving and judging -------------------------------------------------------------

def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, cfg: BuildConfig, figures: dict) -> StableDiffusionPipeline:
    scheduler = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            steps_offset=1)   # as SD 1.5's scheduler config
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # U-Net and VAE go to disk in fp16 (diffusers loads them as fp32 by default); the text encoder
    # stays fp32 because transformers would load fp16 weights as fp16. About 23 MB in all.
    for model in (unet, vae):
        model.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for model in (unet, vae):
        model.to(torch.float32)
    info = {"config": asdict(cfg), "figures": figures, "held_out": [list(p) for p in scenes.HELD_OUT],
            "schedule": SD_SCHEDULE}
    (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
    return pipe


def build(cfg: BuildConfig, out: Path) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t_start = time.time()
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    images, ids = make_dataset(cfg, tokenizer)
    empty_ids = tokenize(tokenizer, [""])[0]
    log(f"{cfg.n_images} scenes drawn ({len(scenes.HELD_OUT)} colour-shape pairs held out)")
    rng = random.Random(cfg.seed + 5)
    extra = [np.asarray(scenes.random_colour_image(rng, outline_p=cfg.vae_outline_p)) for _ in range(cfg.vae_colour_images)]
    vae_images = torch.cat([images, torch.from_numpy(np.stack(extra)).permute(0, 3, 1, 2).float() / 127.5 - 1]) \
        if extra else images
    vae = train_vae(cfg, vae_images)
    mean, std = encode_latents(vae, images)
    scale = 1.0 / mean.std().item()                    # as SD's 0.18215: unit-spread latents
    log(f"latents cached; scaling_factor {scale:.4f}; VAE recon {check_vae(vae, images, mean)}")
    vae = finetune_decoder(cfg, vae, (mean, std), images)
    vae.register_to_config(scaling_factor=scale)
    vae_figs = check_vae(vae, images, mean)
    log(f"decoder fine-tuned; VAE recon {vae_figs}")
    unet, text_encoder, steps_done = train_denoiser(cfg, (mean * scale, std * scale), ids, empty_ids, t_start,
                                                    tokenizer)
    cfg = replace(cfg, unet_steps=steps_done, max_minutes=0.0)
    figures = {"vae": vae_figs, "scaling_factor": scale, "train_minutes": (time.time() - t_start) / 60,
               "params_m": {"vae": n_params(vae), "unet": n_params(unet), "text_encoder": n_params(text_encoder)}}
    pipe = save_pipeline(out, vae, unet, text_encoder, tokenizer, cfg, figures)
    result = evaluate(pipe, cfg.sample_steps, cfg.guidance, cfg.seed)
    figures["held_out_eval"] = {k: result[k] for k in ("colour_acc", "shape_acc", "s_per_image_batched", "n")}
    figures["build_minutes"] = (time.time() - t_start) / 60
    save_pipeline(out, vae, unet, text_encoder, tokenizer, cfg, figures)
    write_model_card(out, cfg, figures)
    log(f"held-out: colour {result['colour_acc']:.0%}, shape {result['shape_acc']:.0%} "
        f"({result['n']} images, {result['s_per_image_batched']:.2f}s/image); saved to {out}")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sdlora.tinybase", description="Build the tiny base model.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train from scratch and save a diffusers pipeline")
    b.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    b.add_argument("--quick", action="store_true", help="a few-minute smoke run (not a usable model)")
    b.add_argument("--unet-steps", type=int, help="override the U-Net training steps")
    b.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="override a BuildConfig field, e.g. --set 'unet_cross_attention=[false,true,true]'")
    b.add_argument("--batch", type=int, help="override the U-Net batch size")
    b.add_argument("--threads", type=int, help="torch CPU threads (default 1)")
    b.add_argument("--max-minutes", type=float, help="stop U-Net training after this long (shared machines)")
    args = parser.parse_args(argv)
    cfg = BuildConfig.quick() if args.quick else BuildConfig()
    if args.unet_steps:
        cfg = replace(cfg, unet_steps=args.unet_steps)
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in BuildConfig.__dataclass_fields__:
            parser.error(f"--set {item}: {name!r} is not a BuildConfig field")
        value = json.loads(value)
        cfg = replace(cfg, **{name: tuple(value) if isinstance(value, list) else value})
    if args.batch:
        cfg = replace(cfg, batch=args.batch)
    if args.threads:
        cfg = replace(cfg, threads=args.threads)
    if args.max_minutes:
        cfg = replace(cfg, max_minutes=args.max_minutes)
    build(cfg, args.out)


if __name__ == "__main__":
    main()
