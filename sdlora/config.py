"""Settings as dataclasses, one per concern, each setting declared once.

Every field of ``LoraSpec``, ``DataConfig`` and ``TrainConfig`` is declared with
``setting(...)``: its default, allowed values, one line of help, its label, its CLI
flag and where the web UI shows it (basic / advanced). The CLI's flags
(``sdlora.cli``), the web UI's controls (``sdlora.webui``) and the validation in
``__post_init__`` are all made from that one declaration, so the front ends cannot
drift. Library code never reads argparse or globals.

A default of ``None`` on a ``derived`` setting means "worked out from the data and
the base" by ``sdlora.training.plan.suggested`` (steps, rank, learning rate,
sample interval), which both front ends call to show the values before training.
Bad values raise ``ConfigError`` (a ``ValueError``) naming the field, the value and
what is allowed, before any model is loaded.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from sdlora.setting import ConfigError, Setting, check_number, check_whole, refused, setting

# Module-name suffixes that LoRA can target (diffusers names).
UNET_CROSS_ATTN = ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
UNET_CROSS_KV = ("attn2.to_k", "attn2.to_v")
UNET_SELF_ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
TEXT_ENCODER_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
KNOWN_TARGETS = UNET_CROSS_ATTN + UNET_SELF_ATTN

# The LoRA learning rate for an SD checkpoint (diffusers' and kohya's usual 1e-4 at alpha = rank).
# A base folder can recommend its own in sdlora's build.json ("lora_lr"): the built-in `tiny` base
# recommends 3e-3 for its key/value adapters (bench/style_quality.py measured what lower rates reach).
DEFAULT_LR = 1e-4


def _check_declared(obj: Any) -> None:
    for s in settings(type(obj)):
        s.check(getattr(obj, s.name))


@dataclass
class LoraSpec:
    """Which modules get adapters, and their shape."""
    rank: int | None = setting(
        None, "LoRA rank r, the width of the update B A: higher learns more detail and the file grows "
        "(default: from the number of images: 4 under 8, 8 up to 30, else 16)",
        label="Rank", ui="basic", kind=int, low=1, high=1024, optional=True, derived=True)
    alpha: float | None = setting(
        None, "LoRA alpha: the update is scaled by alpha / rank (unset: alpha = rank, scale 1)",
        label="Alpha", low=0.0, low_open=True, optional=True)
    dropout: float = setting(0.0, "dropout on the LoRA branch's input while training", label="LoRA dropout",
                             low=0.0, high=0.99)
    cross_attention: str = setting("qkvo", "which cross-attention (attn2) projections to adapt: qkvo (to_q, to_k, "
                                   "to_v, to_out.0: they see the image too, so pass isolation keeps prompts without "
                                   "the trigger as they were) or kv (to_k and to_v: they read only the prompt, so a "
                                   "LoRA on them changes only what the prompt's words ask for; text isolation holds "
                                   "them with no extra U-Net pass; less reach)",
                                   label="Cross-attention projections", choices=("qkvo", "kv"))
    self_attention: bool = setting(False, "also adapt the U-Net's self-attention (attn1)",
                                   label="Also adapt self-attention")
    text_encoder: bool = setting(False, "also train the CLIP text encoder's q/k/v/out (learns the trigger word "
                                 "better; larger file)", label="Train text encoder", ui="basic")
    use_dora: bool = setting(False, "weight-decomposed LoRA (DoRA)", label="DoRA", flag="--dora")
    use_rslora: bool = setting(False, "rank-stabilised LoRA: scale alpha / sqrt(rank)", label="rsLoRA",
                               flag="--rslora")
    adapter: str = setting("lora", "lora: one rank for every module; adalora: AdaLoRA, ranks pruned per module "
                           "during training to an average of rank (the file is an ordinary LoRA whose modules have "
                           "their own ranks)", label="Adapter", choices=("lora", "adalora"))
    adalora_init_rank: int | None = setting(
        None, "AdaLoRA: each module's rank before pruning (default: 1.5 x rank)", label="AdaLoRA starting rank",
        kind=int, low=1, high=1024, optional=True)
    adalora_warmup: float = setting(0.1, "AdaLoRA: share of the steps trained before any rank is pruned",
                                    label="AdaLoRA warm-up share", low=0.0, high=0.9)
    adalora_final: float = setting(0.2, "AdaLoRA: share of the steps trained at the final ranks, after pruning "
                                   "ends", label="AdaLoRA final share", low=0.0, high=0.9)
    adalora_interval: int = setting(10, "AdaLoRA: steps between two rank re-allocations", label="AdaLoRA interval",
                                    low=1, high=10000)
    extra_targets: tuple[str, ...] = setting(
        (), "more U-Net module suffixes to adapt, each one of " + ", ".join(KNOWN_TARGETS), ui="", flag="",
        kind=tuple)

    def __post_init__(self) -> None:
        _check_declared(self)
        if self.rank is not None and self.alpha is None:
            self.alpha = float(self.rank)
        if self.alpha is not None:
            self.alpha = float(self.alpha)
        self.extra_targets = tuple(self.extra_targets)
        if self.adapter == "adalora":
            for name in ("use_dora", "use_rslora"):
                if getattr(self, name):
                    raise refused(name, True, "AdaLoRA has its own parametrisation; use it with adapter 'lora', "
                                  "or turn it off")
            if self.adalora_warmup + self.adalora_final >= 0.95:
                raise refused("adalora_final", self.adalora_final, "the warm-up and final shares together must "
                              "leave steps for pruning: keep their sum under 0.95")
            if self.rank is not None and self.adalora_init_rank is not None and self.adalora_init_rank < self.rank:
                raise refused("adalora_init_rank", self.adalora_init_rank, f"start at least at the average rank "
                              f"{self.rank}: pruning only lowers ranks")
        for t in self.extra_targets:
            if t not in KNOWN_TARGETS:
                raise refused("extra_targets", t, "use one of " + ", ".join(KNOWN_TARGETS))

    @property
    def scale(self) -> float:
        """The factor on B A while training: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
        return self.file_alpha / self._resolved_rank()

    @property
    def file_alpha(self) -> float:
        """The alpha a file gets: the one that gives the same update under every tool's scale = alpha / rank."""
        return file_alpha(self.alpha, self._resolved_rank(), self.use_rslora)

    def _resolved_rank(self) -> int:
        if self.rank is None:
            raise ConfigError("rank is not worked out yet: training.plan.suggested fills it from the data")
        return self.rank

    @property
    def init_rank(self) -> int:
        """AdaLoRA's rank per module before pruning (plain LoRA: the rank)."""
        rank = self._resolved_rank()
        if self.adapter != "adalora":
            return rank
        return self.adalora_init_rank or max(rank + 1, round(1.5 * rank))

    def unet_targets(self) -> tuple[str, ...]:
        out = list(UNET_CROSS_ATTN if self.cross_attention == "qkvo" else UNET_CROSS_KV)
        if self.self_attention:
            out += UNET_SELF_ATTN
        out += [t for t in self.extra_targets if t not in out]
        return tuple(out)


@dataclass
class DataConfig:
    """Where the images are and how each becomes a training example."""
    folder: str = setting("", "folder of images; an image 'a.png' may have its caption in 'a.txt'",
                          label="Images", ui="managed", flag="--data")
    trigger: str = setting("sks", "the word that calls up the style; it is put in front of every caption "
                           "that lacks it (default: the dataset's sdlora.json, else sks)",
                           label="Trigger word", ui="basic")
    template: str = setting("an image in {trigger} style", "caption for images without a .txt; {trigger} is "
                            "replaced by the trigger word", label="Caption for images without a .txt")
    resolution: int | None = setting(None, "training size in px (default: the base's native size)",
                                     label="Resolution (px)", ui="basic", kind=int, low=8, high=2048,
                                     optional=True, derived=True)
    flip: bool = setting(False, "random horizontal flips (a cached latent per side)", label="Random horizontal flip")
    buckets: bool = setting(True, "aspect-ratio buckets: each image trains at the shape nearest its own, with about "
                            "the resolution's area, instead of a centred square crop", label="Aspect-ratio buckets")
    class_prompt: str = setting("", "prior preservation: the prompt of the class, e.g. 'an image'",
                                label="Class prompt (prior preservation)")
    class_folder: str = setting("", "prior preservation: a folder of class images; unset: the base draws them",
                                label="Class images folder", flag="--class-data")
    num_class_images: int = setting(0, "prior preservation: how many class images (0 = off)",
                                    label="Class images", low=0, high=10000)

    def __post_init__(self) -> None:
        _check_declared(self)
        if not self.trigger.strip() or any(c.isspace() for c in self.trigger.strip()):
            raise refused("trigger", self.trigger, "use one word with no spaces, e.g. 'sks' or 'neonstyle'")
        self.trigger = self.trigger.strip()
        if "{trigger}" not in self.template:
            raise refused("template", self.template, "the caption template must contain {trigger}")
        if self.resolution is not None and self.resolution % 8:
            raise refused("resolution", self.resolution, "use a multiple of 8 (the VAE downsamples by 8)")
        if self.num_class_images and not self.class_prompt.strip():
            raise refused("class_prompt", self.class_prompt, "prior preservation needs a class prompt, e.g. 'an image'")


@dataclass
class TrainConfig:
    """The training recipe. Steps are the one unit of length."""
    base: str = setting("tiny", "base model: 'tiny' (built in), a diffusers folder, a single-file .safetensors "
                        "checkpoint or a hub id", label="Base model", ui="basic")
    steps: int | None = setting(None, "optimizer steps, the one unit of length (default: 100 per image, "
                                "400 to 2,000; the base can recommend its own: tiny, 300)", label="Steps",
                                ui="basic", kind=int, low=1, high=1_000_000, optional=True, derived=True)
    batch_size: int = setting(1, "images per step", label="Batch size", low=1, high=1024)
    grad_accum: int = setting(1, "gradient accumulation: micro-batches per optimizer step",
                              label="Gradient accumulation", low=1, high=1024)
    lr: float | None = setting(None, "U-Net LoRA learning rate (default: the base's recommendation, 3e-3 for "
                               "tiny; else 1e-4)", label="Learning rate", ui="basic", low=0.0, high=1.0,
                               low_open=True, optional=True, derived=True)
    text_encoder_lr: float | None = setting(None, "text-encoder LoRA learning rate (unset: the same as lr)",
                                            label="Text-encoder learning rate", low=0.0, high=1.0,
                                            low_open=True, optional=True)
    schedule: str = setting("constant", "learning-rate schedule after warmup", label="LR schedule",
                            choices=("constant", "cosine"))
    warmup_steps: int = setting(0, "steps of linear learning-rate warmup", label="Warmup steps", low=0)
    weight_decay: float = setting(1e-2, "AdamW weight decay on the LoRA weights", label="Weight decay",
                                  low=0.0, high=1.0)
    base_precision: str = setting(
        "auto", "how the frozen base is kept: fp32, bf16, fp16, or its linear layers quantised with bitsandbytes "
        "(int8, nf4: QLoRA; the adapters stay fp32); auto: the mixed-precision dtype", label="Base precision",
        choices=("auto", "fp32", "bf16", "fp16", "int8", "nf4"))
    vae: str = setting("", "a VAE to train with instead of the base's: a diffusers folder, a .safetensors file "
                       "or a hub id; one whose config says it is fp16-safe (force_upcast false, e.g. an SDXL "
                       "'fp16-fix' VAE) stays in fp16 under fp16 mixed precision, the others encode in fp32",
                       label="VAE (optional)")
    use_8bit_adam: bool = setting(True, "bitsandbytes' 8-bit AdamW where it and CUDA are present (the run says "
                                  "which optimizer it uses)", label="8-bit Adam (CUDA)", flag="--8bit-adam")
    mixed_precision: str = setting("no", "mixed precision: fp16 needs a CUDA GPU", label="Mixed precision",
                                   choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: less memory, "
                                           "slower steps", label="Gradient checkpointing")
    noise_offset: float = setting(0.0, "adds offset x N(0,1) per channel to the noise (darker darks, "
                                  "brighter brights)", label="Noise offset", low=0.0, high=1.0)
    min_snr_gamma: float | None = setting(None, "Min-SNR loss weighting gamma (unset: off; 5 is usual)",
                                          label="Min-SNR gamma", low=0.0, low_open=True, optional=True)
    prior_loss_weight: float = setting(1.0, "prior preservation: weight of the class images' loss",
                                       label="Prior loss weight", low=0.0)
    # Keep the trigger the switch: on each step's noisy latents, the model's prediction for the
    # caption without the trigger (or for the empty caption that classifier-free guidance uses) is
    # pulled toward the frozen base's, with this weight. Without it a style LoRA also restyles
    # prompts that lack the trigger, and guidance subtracts the style from itself.
    trigger_isolation: float = setting(1.0, "keeps prompts without the trigger (and guidance's empty prompt) as "
                                       "the base draws them; 0 = off (no second U-Net pass, no isolation pictures)",
                                       label="Trigger isolation", low=0.0)
    isolation: str = setting("auto", "how trigger isolation keeps prompts without the trigger: text (a penalty on what "
                             "the cross-attention key/value adapters do to their words' states: no extra U-Net pass; "
                             "only for key/value adapters on a frozen text encoder), pass (a second U-Net pass on them "
                             "every isolation-every steps, against the frozen base's: holds every adapter; on every "
                             "step it doubles a step's cost), "
                             "or auto: text where it can hold the adapters, else pass",
                             label="Isolation method", choices=("auto", "text", "pass"))
    isolation_every: int = setting(8, "pass isolation: run the second pass every N steps (weighted N times)",
                                   label="Isolation every N steps", low=1)
    isolation_images: str = setting("base", "pass isolation: the pictures the captions without the trigger are held "
                                    "on: base (the base's own picture of each caption without the trigger and of "
                                    "the empty caption, drawn once before training and kept in the run's "
                                    "isolation_images/) or training (the style's training images)",
                                    label="Isolation images", choices=("base", "training"))
    # Each step may train on a variant of a caption with words other than the trigger left out (the
    # trigger-less captions of trigger_isolation follow the same variants), so the trigger is the one
    # word every caption of the style shares.
    word_dropout: float = setting(0.0, "leave each caption word but the trigger out with this probability, in "
                                  "caption-variants versions per image (0 = off)", label="Word dropout",
                                  low=0.0, high=0.95)
    caption_variants: int = setting(8, "versions of each caption that word dropout and tag shuffling train on",
                                    label="Caption variants", low=1, high=256)
    shuffle_tags: bool = setting(False, "train on caption-variants versions of each caption with its comma-separated "
                                 "tags in shuffled order (the first keep-tags and the trigger stay in place)",
                                 label="Shuffle tags")
    keep_tags: int = setting(0, "with shuffle-tags: how many leading tags stay in place", label="Keep first N tags",
                             low=0, high=75)
    caption_dropout: float = setting(0.0, "the share of examples that train on the empty caption instead of their "
                                     "own (0 = off)", label="Caption dropout", low=0.0, high=0.95)
    seed: int = setting(0, "random seed: the same seed and settings give the same LoRA", label="Seed",
                        low=0, high=2**32 - 1)
    calibrate_strength: bool = setting(True, "after training, draw the training captions at strengths 0.5, 0.75 and "
                                       "1 with the base's sampling, and make the closest to the training images the "
                                       "file's strength 1 (guidance can push a style past them; plain LoRA only)",
                                       label="Calibrate strength")
    sample_every: int | None = setting(None, "steps between sample images, with and without the trigger "
                                       "(default: 5 times per run; 0 = none)", label="Samples every N steps",
                                       kind=int, low=0, optional=True, derived=True)
    sample_prompts: tuple[str, ...] = setting((), "sample prompts (default: the first caption, then it without "
                                              "the trigger)", ui="", flag="", kind=tuple)
    sample_seeds: tuple[int, ...] = setting((1, 2), "seeds of the sample images", ui="", flag="", kind=tuple)
    checkpoint_every: int = setting(0, "steps between resumable checkpoints (0: only when stopped and at the "
                                    "end)", label="Checkpoint every N steps", low=0)
    output_dir: str = setting("outputs", "each run gets its own new folder below this one", label="Output folder",
                              ui="managed")
    run_name: str = setting("", "run folder and file name (default: the trigger word)", label="Run name",
                            flag="--name")
    save_format: str = setting("kohya", "file layout: kohya loads in A1111, ComfyUI and diffusers; diffusers "
                               "loads in diffusers only", label="File format", flag="--format",
                               choices=("kohya", "diffusers"))
    save_dtype: str = setting("fp16", "precision of the saved LoRA", label="Saved precision",
                              choices=("fp16", "bf16", "fp32"))

    def __post_init__(self) -> None:
        _check_declared(self)
        if not self.base.strip():
            raise refused("base", self.base, "use 'tiny', a folder, a .safetensors file or a hub id")
        self.sample_prompts = tuple(self.sample_prompts)
        self.sample_seeds = tuple(int(s) for s in self.sample_seeds)
        if self.base_precision == "fp16" and self.mixed_precision == "bf16":
            raise refused("base_precision", self.base_precision, "with bf16 mixed precision keep the base in bf16, "
                          "fp32, int8 or nf4")
        if self.run_name and (("/" in self.run_name) or ("\\" in self.run_name) or self.run_name.startswith(".")):
            raise refused("run_name", self.run_name, "use a plain name without '/', '\\' or a leading '.'")


def base_precision(cfg: TrainConfig) -> str:
    """The base precision a run uses: 'auto' is the mixed-precision dtype (fp32 with mixed precision off)."""
    if cfg.base_precision != "auto":
        return cfg.base_precision
    return cfg.mixed_precision if cfg.mixed_precision in ("fp16", "bf16") else "fp32"


def file_alpha(alpha: float, rank: int, rslora: bool) -> float:
    """rsLoRA scales B A by alpha / sqrt(rank) (Kalajdzievski 2023); A1111, ComfyUI and diffusers apply
    alpha / rank, so the same update is written as alpha * sqrt(rank). Plain LoRA keeps its alpha."""
    return alpha * math.sqrt(rank) if rslora else alpha


def isolation_method(spec: LoraSpec, cfg: TrainConfig) -> str:
    """The isolation a run uses: cfg.isolation, with auto resolved to text when only cross-attention key/value
    adapters train (plain LoRA, frozen text encoder), else pass."""
    if cfg.isolation != "auto":
        return cfg.isolation
    text_holds = (spec.cross_attention == "kv" and not spec.self_attention and not spec.extra_targets
                  and not spec.text_encoder and spec.adapter == "lora")
    return "text" if text_holds else "pass"


STEPS_PER_IMAGE = 100      # an SD checkpoint's; a base folder can recommend its own ("lora_steps_per_image")


def default_steps(num_images: int, per_image: int = STEPS_PER_IMAGE) -> int:
    """Steps derived from the number of images: `per_image` for each, counted over 4 to 20 images (so 400..2000 at
    the default 100 per image).

    Style LoRAs on SD 1.5 commonly converge in 1,000-2,000 steps at batch 1 for 10-20 images; fewer images need
    fewer steps before they are memorised. The built-in `tiny` base recommends 300 per image in its build.json:
    default LoRAs met every bar of bench/style_quality.py on 6 of its 7 styles at 300 (5 on training seeds 3-5),
    on 5 at 100 (5 on seeds 3-5 too).
    """
    return per_image * max(4, min(20, num_images))


def default_rank(num_images: int) -> int:
    """Rank derived from the number of images: a few images hold less to learn (and over-fit sooner)."""
    return 4 if num_images < 8 else 8 if num_images <= 30 else 16


CONFIG_CLASSES = {"data": DataConfig, "lora": LoraSpec, "train": TrainConfig}


def settings(cls: type | None = None) -> list[Setting]:
    """The declared settings of one config class, or of all three (data, lora, train) in that order."""
    if cls is None:
        return [s for c in CONFIG_CLASSES.values() for s in settings(c)]
    owner = next(k for k, c in CONFIG_CLASSES.items() if c is cls)
    out = []
    for f in fields(cls):
        meta = dict(f.metadata["setting"])
        flag = meta.pop("flag")
        flag = "--" + f.name.replace("_", "-") if flag is None else flag
        out.append(Setting(name=f.name, owner=owner, flag=flag, **meta))
    return out


def configs_from_values(values: dict[str, Any]) -> tuple[DataConfig, LoraSpec, TrainConfig]:
    """The three configs from {setting name: value}; a name that is missing keeps its default."""
    known = {s.name for s in settings()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    made = {owner: cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})
            for owner, cls in CONFIG_CLASSES.items()}
    return made["data"], made["lora"], made["train"]


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
        check_whole("seed", self.seed, 0, 2**32 - 1)
        check_whole("steps", self.steps, 1, 500)
        check_number("guidance", self.guidance, 0.0, 50.0)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None:
                check_whole(name, v, 8, 4096)
                if v % 8:
                    raise refused(name, v, "use a multiple of 8")


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
    "ConfigError", "Setting", "LoraSpec", "DataConfig", "TrainConfig", "GenerateConfig", "default_steps",
    "STEPS_PER_IMAGE", "default_rank", "file_alpha", "isolation_method", "base_precision", "settings", "configs_from_values", "to_dict", "from_dict", "UNET_CROSS_ATTN",
    "UNET_SELF_ATTN", "TEXT_ENCODER_ATTN", "DEFAULT_LR",
]
