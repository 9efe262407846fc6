"""Generate images from a base with one or more LoRAs at chosen strengths.

The base is loaded once; LoRA files are read once (cached by path and mtime);
moving a strength only changes numbers in ``stack.LoraStack``. Training samples
go through ``render``, the same function every generation uses.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from sdlora.bases import families
from sdlora.loras import detect
from sdlora.loras import diffusers_layout
from sdlora.loras import layouts as formats
from sdlora.config import GenerateConfig
from sdlora.bases.load import Base, load_base
from sdlora.loras.apply import Applied, LoraStack
from sdlora.loras.naming import naming_for


@dataclass
class LoraChoice:
    """A LoRA file and its strengths (A1111's <lora:name:te:unet>, ComfyUI's strength_clip / strength_model)."""
    path: str
    strength: float = 1.0                 # U-Net strength
    te_strength: float | None = None      # text-encoder strength; None means the same as strength

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """'file.safetensors', 'file.safetensors:0.8' or 'file.safetensors:0.8:0.5' (unet, then te)."""
        parts = text.rsplit(":", 2)
        nums: list[float] = []
        while len(parts) > 1:
            try:
                nums.insert(0, float(parts[-1]))
            except ValueError:
                break
            parts.pop()
        path = ":".join(parts)
        if len(nums) > 2:
            raise ValueError(f"{text!r}: use FILE, FILE:STRENGTH or FILE:UNET_STRENGTH:TE_STRENGTH")
        return cls(path, *nums)


@dataclass
class LoadedLora:
    path: str
    loras: formats.LoraSet
    metadata: dict[str, str]
    unused: list[str] = field(default_factory=list)   # keys that map to no module of the base
    family: str = "unknown"


def read_lora(path: str | Path, base: Base, allow_pickle: bool = False) -> LoadedLora:
    """Read a LoRA file of any supported format and match it to the base's modules."""
    sd, meta = formats.read_lora_file(path, allow_pickle=allow_pickle)
    family = detect.detect_family(sd, meta)
    if family not in (families.UNKNOWN, base.family):
        raise formats.LoraFileError(
            f"{path} is a LoRA for {families.title(family)} but the base '{base.name}' is "
            f"{families.title(base.family)}; load it on a {families.title(family)} base")
    fmt = detect.detect_format(sd)
    if fmt == "kohya":
        loras, unused = formats.from_kohya(sd, base.module_names(), naming_for(base))
    elif fmt in ("diffusers", "peft"):
        loras, unused = diffusers_layout.from_diffusers(sd, meta, module_names=base.module_names())
    elif fmt == "comfyui":
        from sdlora.loras.comfyui import from_comfyui, unapplied_note
        loras, unused = from_comfyui(sd, base.module_names(), dict(base.unet.config))
        note = unapplied_note(path, unused)     # ComfyUI bias/norm deltas: listed in unused, and said why
        if note:
            warnings.warn(note, stacklevel=2)
    else:
        raise formats.LoraFileError(f"{path}: not a LoRA file sdlora knows (no kohya, diffusers or ComfyUI "
                                    "LoRA keys)")
    if not loras:
        raise formats.LoraFileError(f"{path}: none of its {len(sd)} keys matches a module of the base "
                                    f"'{base.name}'; first keys: {sorted(sd)[:3]}")
    return LoadedLora(str(path), loras, meta, unused, family)


def render(pipe, cfg: GenerateConfig, resolution: int) -> Image.Image:
    """One image from a diffusers pipeline; the same seed gives the same image."""
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch.no_grad():
        out = pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt or None,
                   num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                   width=cfg.width or resolution, height=cfg.height or resolution,
                   generator=gen, output_type="pil")
    return out.images[0]


# Images drawn in one pipeline call by render_many: as many as fit this many pixels (4 at SD 1.5's 512 px, 1 at
# SDXL's 1,024, capped at MAX_BATCH), so a batch needs no more memory than a few images of the base's own size.
BATCH_PIXELS = 4 * 512 * 512
MAX_BATCH = 16


def batch_size(width: int, height: int) -> int:
    """How many images of width x height px render_many draws in one pipeline call."""
    return max(1, min(MAX_BATCH, BATCH_PIXELS // (width * height)))


def draw_batch(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, width: int, height: int,
               negative_prompts: list[str] | None = None, output_type: str = "pil") -> list:
    """The images of `prompts` (one seed each) at one size, in batches of batch_size() per pipeline call. Each image
    starts from its own seed's noise, so it is the image render() draws for that prompt and seed, up to the rounding
    of batched arithmetic (at most one level of 255 in a pixel on the tiny base). `negative_prompts`: one per prompt,
    or None for none (an empty negative prompt is no negative prompt, as in render). A batch the device has no memory
    for is drawn again one image at a time, so batching never fails where render() would not."""
    if len(seeds) != len(prompts) or (negative_prompts is not None and len(negative_prompts) != len(prompts)):
        raise ValueError(f"draw_batch: {len(prompts)} prompts need as many seeds and negative prompts "
                         f"(got {len(seeds)} seeds, {len(negative_prompts or prompts)} negative prompts)")

    def call(part: slice) -> list:
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[part]]
        with torch.no_grad():
            return list(pipe(prompt=prompts[part], negative_prompt=None if negative_prompts is None
                             else negative_prompts[part], num_inference_steps=steps, guidance_scale=guidance,
                             width=width, height=height, generator=generators, output_type=output_type).images)

    out: list = []
    size = batch_size(width, height)
    for i in range(0, len(prompts), size):
        part = slice(i, min(i + size, len(prompts)))
        try:
            out += call(part)
        except torch.OutOfMemoryError:
            if part.stop - part.start == 1:
                raise
            if torch.cuda.is_available():   # a GPU short of memory (training's state still on it): one at a time
                torch.cuda.empty_cache()
            for j in range(part.start, part.stop):
                out += call(slice(j, j + 1))
    return out


def render_many(pipe, cfgs: list[GenerateConfig], resolution: int, output_type: str = "pil") -> list:
    """render() of each request, in order, drawn in batches of the requests that share their steps, guidance, size
    and whether they have a negative prompt (see draw_batch for how close each image is to render()'s); with
    output_type "pt", each image is a (3, H, W) tensor in 0..1 instead of a PIL image."""
    groups: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        key = (cfg.steps, cfg.guidance, cfg.width or resolution, cfg.height or resolution, bool(cfg.negative_prompt))
        groups.setdefault(key, []).append(i)
    images: list = [None] * len(cfgs)
    for (steps, guidance, width, height, negative), idx in groups.items():
        drawn = draw_batch(pipe, [cfgs[i].prompt for i in idx], [cfgs[i].seed for i in idx], steps, guidance,
                           width, height, [cfgs[i].negative_prompt for i in idx] if negative else None, output_type)
        for i, image in zip(idx, drawn):
            images[i] = image
    return images


def make_pipeline(base: Base):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if base.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder,
                                         text_encoder_2=base.text_encoder_2, tokenizer=base.tokenizer,
                                         tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=base.scheduler,
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                       unet=base.unet, scheduler=base.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Generator:
    """A base pipeline plus a stack of LoRAs; thread-safe, one call at a time.

    The stack and its lock belong to the base (load_base shares one copy of a base per process): every
    Generator of a base sets the whole stack, so one never draws with LoRAs another left applied."""

    def __init__(self, base: Base | str = "tiny", precision: str | None = None):
        """``precision`` (base named by a string): fp32 | bf16 | fp16 | int8 | nf4, see sdlora.bases.precision."""
        self.base = load_base(base, precision=precision) if isinstance(base, str) else base
        self.pipe = make_pipeline(self.base)
        if self.base.lora_stack is None:
            self.base.lora_stack = LoraStack({"unet": self.base.unet, **self.base.text_encoders})
        self.stack, self.lock = self.base.lora_stack, self.base.lora_stack.lock
        self._files: dict[str, tuple[float, LoadedLora]] = {}
        self._choices: list[LoraChoice] = []
        self._fused = False

    def load(self, path: str | Path) -> LoadedLora:
        p = Path(path)
        if not p.is_file():
            raise formats.LoraFileError(f"LoRA file {p} does not exist; check the path")
        key, mtime = str(p.resolve()), p.stat().st_mtime
        hit = self._files.get(key)
        if hit is None or hit[0] != mtime:
            hit = (mtime, read_lora(p, self.base))
            self._files[key] = hit
        return hit[1]

    def set_loras(self, choices: list[LoraChoice], fused: bool = False) -> list[LoadedLora]:
        loaded = [self.load(c.path) for c in choices]
        applied = [Applied(Path(c.path).stem, ld.loras, c.strength,
                           c.strength if c.te_strength is None else c.te_strength)
                   for c, ld in zip(choices, loaded)]
        with self.lock:
            self.stack.set(applied, fused=fused)
            self.stack.owner, self._choices, self._fused = self, list(choices), fused
        return loaded

    def generate(self, cfg: GenerateConfig, choices: list[LoraChoice] | None = None,
                 fused: bool = False) -> Image.Image:
        """One image with `choices` at their strengths; None keeps the LoRAs (and the fused mode) this
        Generator set last, re-applied only if another Generator of the base has set the stack since."""
        with self.lock:
            self._apply(choices, fused)
            return render(self.pipe, cfg, self.base.resolution)

    def generate_many(self, cfgs: list[GenerateConfig], choices: list[LoraChoice] | None = None,
                      fused: bool = False) -> list[Image.Image]:
        """generate() of each request with the same LoRAs, drawn in batches (render_many): faster than one at a time
        where a call's fixed cost is much of it (the tiny base on CPU: about half the time), each image equal to
        generate()'s up to the rounding of batched arithmetic."""
        with self.lock:
            self._apply(choices, fused)
            return render_many(self.pipe, cfgs, self.base.resolution)

    def _apply(self, choices: list[LoraChoice] | None, fused: bool) -> None:
        """Set `choices` on the stack, or with None this Generator's last ones again if another Generator of the base
        has set the stack since (the caller holds the lock)."""
        if choices is not None:
            self.set_loras(choices, fused)
        elif self.stack.owner is not self:
            self.set_loras(self._choices, self._fused)

    def sweep(self, cfg: GenerateConfig, choice: LoraChoice,
              strengths=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[Image.Image]:
        """The same prompt and seed at several strengths of one LoRA."""
        return [self.generate(cfg, [LoraChoice(choice.path, s, None if choice.te_strength is None
                                               else choice.te_strength * s)]) for s in strengths]


def merge(generator: Generator, out: str | Path, dtype: torch.dtype = torch.float16,
          metadata: dict | None = None) -> Path:
    """Write the generator's base with its current LoRAs fused in, as an original-SD single file that
    A1111 and ComfyUI load as a model (and sdlora as a base: its variant is in the header)."""
    from sdlora.bases.single_file import save_single_file
    base = generator.base
    with generator.lock:
        generator.stack.set(generator.stack.applied, fused=True)
        return save_single_file(out, base.unet, base.vae, base.text_encoder, base.family, dtype=dtype,
                                metadata=metadata, prediction_type=base.prediction_type,
                                text_encoder_2=base.text_encoder_2)


__all__ = ["Generator", "LoraChoice", "LoadedLora", "read_lora", "render", "render_many", "draw_batch", "batch_size",
           "make_pipeline", "merge"]
