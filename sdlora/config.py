"""Settings as dataclasses, one per concern.

The CLI and the web UI both build these objects; library code never reads
argparse or globals. Every field has a default; `__post_init__` checks each
value and raises `ConfigError` (a `ValueError`) naming the field, the value
and what is allowed, before any model is loaded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# Module-name suffixes that LoRA can target (diffusers names).
UNET_CROSS_ATTN = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
UNET_SELF_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
TEXT_ENCODER_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
KNOWN_TARGETS = UNET_CROSS_ATTN + UNET_SELF_ATTN

MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULES = ("constant", "cosine")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
SAVE_FORMATS = ("kohya", "diffusers")


class ConfigError(ValueError):
    """A setting has a value that is not allowed."""


def _bad(field_name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{field_name}={value!r} is not allowed: {allowed}")


def _finite(name: str, value: float, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _bad(name, value, "use a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise _bad(name, value, f"use a number {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise _bad(name, value, f"use a number <= {high}")


def _int(name: str, value: Any, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, "use a whole number")
    if value < low or (high is not None and value > high):
        raise _bad(name, value, f"use a whole number from {low}" + (f" to {high}" if high else " up"))


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _bad(name, value, "use one of " + ", ".join(allowed))


@dataclass
class LoraSpec:
    """Which modules get adapters, and their shape."""
    rank: int = 8                      # r: width of the low-rank update B A
    alpha: float | None = None         # scale is alpha / rank; None means alpha = rank (scale 1)
    dropout: float = 0.0               # dropout on the LoRA branch input while training
    self_attention: bool = False       # also adapt attn1 (self-attention) in the U-Net
    text_encoder: bool = False         # also adapt the CLIP text encoder's q/k/v/out_proj
    use_dora: bool = False             # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False           # rank-stabilised scale alpha / sqrt(rank)
    extra_targets: tuple[str, ...] = ()  # more U-Net suffixes, each one of KNOWN_TARGETS

    def __post_init__(self) -> None:
        _int("rank", self.rank, 1, 1024)
        if self.alpha is None:
            self.alpha = float(self.rank)
        _finite("alpha", self.alpha, 0.0, low_open=True)
        self.alpha = float(self.alpha)
        _finite("dropout", self.dropout, 0.0, 0.99)
        self.extra_targets = tuple(self.extra_targets)
        for t in self.extra_targets:
            _choice("extra_targets", t, KNOWN_TARGETS)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def unet_targets(self) -> tuple[str, ...]:
        out = list(UNET_CROSS_ATTN)
        if self.self_attention:
            out += UNET_SELF_ATTN
        out += [t for t in self.extra_targets if t not in out]
        return tuple(out)


@dataclass
class DataConfig:
    """Where the images are and how each becomes a training example."""
    folder: str = ""                              # folder of images with optional same-name .txt captions
    trigger: str = "sks"                          # the token that calls up the style
    template: str = "an image in {trigger} style"  # caption for images without a .txt file
    resolution: int | None = None                 # px; None means the base's native size
    flip: bool = False                            # random horizontal flip (a cached latent per side)
    class_prompt: str = ""                        # prior preservation: prompt for class images
    class_folder: str = ""                        # prior preservation: folder; generated when empty
    num_class_images: int = 0                     # 0 disables prior preservation

    def __post_init__(self) -> None:
        if not isinstance(self.trigger, str) or not self.trigger.strip() or any(c.isspace() for c in self.trigger.strip()):
            raise _bad("trigger", self.trigger, "use one word with no spaces, e.g. 'sks' or 'neonstyle'")
        self.trigger = self.trigger.strip()
        if "{trigger}" not in self.template:
            raise _bad("template", self.template, "the caption template must contain {trigger}")
        if self.resolution is not None:
            _int("resolution", self.resolution, 8, 2048)
            if self.resolution % 8:
                raise _bad("resolution", self.resolution, "use a multiple of 8 (the VAE downsamples by 8)")
        _int("num_class_images", self.num_class_images, 0, 10000)
        if self.num_class_images and not self.class_prompt.strip():
            raise _bad("class_prompt", self.class_prompt, "prior preservation needs a class prompt, e.g. 'an image'")


@dataclass
class TrainConfig:
    """The training recipe. Steps are the one unit of length."""
    base: str = "tiny"                 # 'tiny', a diffusers folder, a single-file checkpoint or a hub id
    steps: int | None = None           # optimizer steps; None derives it from the number of images
    batch_size: int = 1
    grad_accum: int = 1                # gradient accumulation steps per optimizer step
    lr: float | None = None            # U-Net LoRA learning rate; None: the base's recommendation, else DEFAULT_LR
    text_encoder_lr: float | None = None  # None means the same as lr
    schedule: str = "constant"         # constant or cosine, after warmup
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    use_8bit_adam: bool = True         # used only where bitsandbytes and CUDA are present
    mixed_precision: str = "no"        # no, fp16 or bf16
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0          # adds offset * N(0,1) per channel to the noise
    min_snr_gamma: float | None = None  # Min-SNR loss weighting; None disables (5.0 is usual)
    prior_loss_weight: float = 1.0
    # Keep the trigger the switch: on each step's noisy latents, the model's prediction for the
    # caption without the trigger (or for the empty caption that classifier-free guidance uses) is
    # pulled toward the frozen base's, with this weight; 0 disables. Without it a style LoRA also
    # restyles prompts that lack the trigger, and guidance subtracts the style from itself.
    trigger_isolation: float = 1.0
    # Each step may train on a variant of a caption with words other than the trigger left out, each
    # with this probability (caption_variants per image, the full caption among them; the trigger-less
    # captions of trigger_isolation follow the same variants). The trigger is then the one word every
    # caption of the style shares, so the style is tied to it rather than to the content words.
    word_dropout: float = 0.0
    caption_variants: int = 8
    seed: int = 0
    sample_every: int = 0              # steps between sample images; 0 disables
    sample_prompts: tuple[str, ...] = ()  # default: the trigger prompt and a prompt without it
    sample_seeds: tuple[int, ...] = (1, 2)
    checkpoint_every: int = 0          # steps between resumable checkpoints; 0 means only at the end
    output_dir: str = "outputs"        # each run gets its own new folder below this
    run_name: str = ""                 # folder and file name; empty derives one from the trigger
    save_format: str = "kohya"         # kohya (loads everywhere) or diffusers
    save_dtype: str = "fp16"

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base.strip():
            raise _bad("base", self.base, "use 'tiny', a folder, a .safetensors file or a hub id")
        if self.steps is not None:
            _int("steps", self.steps, 1, 1_000_000)
        _int("batch_size", self.batch_size, 1, 1024)
        _int("grad_accum", self.grad_accum, 1, 1024)
        if self.lr is not None:
            _finite("lr", self.lr, 0.0, 1.0, low_open=True)
        if self.text_encoder_lr is not None:
            _finite("text_encoder_lr", self.text_encoder_lr, 0.0, 1.0, low_open=True)
        _choice("schedule", self.schedule, SCHEDULES)
        _int("warmup_steps", self.warmup_steps, 0)
        _finite("weight_decay", self.weight_decay, 0.0, 1.0)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _finite("noise_offset", self.noise_offset, 0.0, 1.0)
        if self.min_snr_gamma is not None:
            _finite("min_snr_gamma", self.min_snr_gamma, 0.0, low_open=True)
        _finite("prior_loss_weight", self.prior_loss_weight, 0.0)
        _finite("trigger_isolation", self.trigger_isolation, 0.0)
        _finite("word_dropout", self.word_dropout, 0.0, 0.95)
        _int("caption_variants", self.caption_variants, 1, 256)
        _int("seed", self.seed, 0, 2**32 - 1)
        _int("sample_every", self.sample_every, 0)
        _int("checkpoint_every", self.checkpoint_every, 0)
        _choice("save_format", self.save_format, SAVE_FORMATS)
        _choice("save_dtype", self.save_dtype, SAVE_DTYPES)
        self.sample_prompts = tuple(self.sample_prompts)
        self.sample_seeds = tuple(int(s) for s in self.sample_seeds)
        if self.run_name and (("/" in self.run_name) or ("\\" in self.run_name) or self.run_name.startswith(".")):
            raise _bad("run_name", self.run_name, "use a plain name without '/', '\\' or a leading '.'")


# The LoRA learning rate for an SD checkpoint (diffusers' and kohya's usual 1e-4 at alpha = rank).
# A base folder can recommend its own in sdlora's build.json ("lora_lr"): the built-in `tiny` base
# recommends 1e-3, since at 1e-4 a style moves 5% of the way in the default steps (see its README).
DEFAULT_LR = 1e-4


def default_steps(num_images: int) -> int:
    """Steps derived from the number of images: 100 per image, clamped to 400..2000.

    Style LoRAs on SD 1.5 commonly converge in 1,000-2,000 steps at batch 1 for 10-20
    images; fewer images need fewer steps before they are memorised.
    """
    return max(400, min(2000, 100 * num_images))


@dataclass
class GenerateConfig:
    """One generation request."""
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 25                    # denoising steps
    guidance: float = 7.5              # classifier-free guidance scale; 1 disables
    width: int | None = None           # px; None means the base's native size
    height: int | None = None

    def __post_init__(self) -> None:
        _int("seed", self.seed, 0, 2**32 - 1)
        _int("steps", self.steps, 1, 500)
        _finite("guidance", self.guidance, 0.0, 50.0)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None:
                _int(name, v, 8, 4096)
                if v % 8:
                    raise _bad(name, v, "use a multiple of 8")


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    d = asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls: type, d: dict[str, Any]) -> Any:
    """Build a config from a dict, refusing unknown keys by name."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return cls(**d)


__all__ = [
    "ConfigError", "LoraSpec", "DataConfig", "TrainConfig", "GenerateConfig", "default_steps",
    "to_dict", "from_dict", "UNET_CROSS_ATTN", "UNET_SELF_ATTN", "TEXT_ENCODER_ATTN",
]
