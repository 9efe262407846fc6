"""The built-in base's build settings (`BuildConfig`) and its three models' architectures."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlora.tinybase import scenes


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
    # px: an outline's width is drawn from this range. 1-5 (with tints) drew pastel's thick outline and palette:
    # the previous base, 2-4 px without tints, met every bar of bench/style_quality.py on 3 of the 7 example
    # styles, this one on 4 (pastel and sage pass, dashed is lost: its thinnest outlines come out in pieces).
    outline_widths: tuple[float, float] = (1.0, 5.0)
    # What else a scene may be, so that the U-Net has seen more than six colours on five backgrounds: this share
    # of scenes has its shape's colour pale or dark (scenes.TINTS, always named: "a pale red circle"), and this
    # share a muted background of any hue that no caption names. 0 draws exactly the scenes of a build without.
    # Backdrops (0.25 beside tints 0.3) cost dashed and sage their bars, so the shipped base draws none.
    tint_p: float = 0.3
    backdrop_p: float = 0.0
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
    # Textured images (sdlora.tinybase.textures: hatching, dots, grain, strokes at 2-8 px, any colours) for the
    # VAE, and the weight of its texture-energy loss (stages.texture_loss): without them the VAE gave back
    # about 7% of a fine texture, so no LoRA could reach a textured style.
    texture_p: float = 0.25             # share of scenes with a striped, dotted or speckled background
    texture_shades: tuple[float, float] = (0.55, 0.55)   # a texture's ink, as scenes.Scene.texture_shade: one
                                        # value, or a range each textured scene draws from
    # Name a striped background's angle and width in its caption ("a wide diagonal striped white background",
    # scenes.STRIPE_ANGLES / STRIPE_WIDTHS). Without names a striped scene's angle is one of four at random, so
    # the U-Net learns "striped" as all of them at once: the base built without names draws "... on a striped
    # white background" as a faint criss-cross, its lines' contrast in any direction at most 3.4 on 8 images
    # (textures.line_contrast; drawn stripes read 60-70), and hatch's LoRAs drew the same criss-cross. A base built
    # with names met every bar of bench/style_quality.py on 1 of the 7 styles (hatch's lines 17%, the prompt's
    # colour kept in 28-78% of images; README, Learning quality), so the built-in base is built without them.
    stripe_words: bool = False
    vae_texture_images: int = 4000
    texture_weight: float = 1.0
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32                  # VAE trains on random crops (it is fully convolutional)
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6             # SD's KL weight for its f=8 KL-autoencoder
    decoder_steps: int = 1000           # then the decoder alone, encoder frozen
    decoder_lr: float = 3e-4
    # Last, the decoder alone again (stages.refine_decoder), after the U-Net, which reads only the encoder's
    # latents and so is the same without this stage: whole images, the VAE images plus line_images of lines at 4
    # angles 4-8 px apart, and a loss on each latent cell's change in 4 directions (weight direction_weight).
    # The latents held the lines' direction and the decoder did not give it back: 45-degree lines 6 px apart
    # kept 13% of it, as a mush with the lines' texture energy. 0 steps: no such stage. On the previous base (1,500
    # steps, 4,000 line images, weight 2) it kept 72%, but default LoRAs drew few more lines and met fewer bars
    # (README, Learning quality), so the built-in base is built without it.
    refine_steps: int = 0
    line_images: int = 0
    direction_weight: float = 0.0
    text_hidden: int = 64               # CLIP text width = U-Net cross_attention_dim
    text_layers: int = 2
    unet_channels: tuple = (32, 64, 128)  # at 16x16, 8x8 and 4x4 latents
    # Cross-attention per level. SD attends at its three high-resolution levels; here 16x16 attention
    # costs 1.5x per step, and with it (True, True, False) drew the prompt's shape in 17% of held-out
    # images after the 2,239 steps that fit the time budget (colour 92%), against 94% for this layout.
    # (True, True, True), all 3,575 steps in 50-57 min, kept the held-out figures (colour 100%, shape 98%);
    # default LoRAs met every bar of bench/style_quality.py (the mean of 3 training seeds) on 2 of the 7
    # example styles there as here (pastel's outline 95% of the way, here 57%; neon's fill 41%, here 48%).
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
    lora_lr: float = 3e-3               # recommended LoRA learning rate (trainers read it from build.json): with
                                        # key/value adapters and text isolation, 1e-3 moved neon's fill ratio 20-39%
                                        # of the way in 1,000 steps, 3e-3 73% (bench/style_quality.py)
    lora_steps_per_image: int = 300     # recommended LoRA steps per image (build.json; 100 for SD checkpoints): with
                                        # the default recipe, 10 images, training seeds 0-2 and 3-5, 1,000 steps met
                                        # every bar of bench/style_quality.py on 5 and 5 of the 7 styles, 3,000 on 6
                                        # and 5 (hatch 53% / 44% and 56% / 59%; 33% / 17% and 47% / 37% at 1,000)

    @classmethod
    def quick(cls) -> "BuildConfig":
        """A few-minute end-to-end check; the model it makes is not usable."""
        return cls(n_images=600, vae_colour_images=600, vae_texture_images=300, vae_steps=60, decoder_steps=60,
                   unet_steps=60, warmup=20)


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so a failed write leaves the old file whole (the
    build stands apart from sdlora.safefiles, whose atomic writer the product uses)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def log(msg: str) -> None:
    print(f"[tinybase {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def n_params(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


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
