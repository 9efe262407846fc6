"""A run's training examples: latents and text embeddings cached once, and random batches of them.

Latents are encoded once per image (and per flip); while the text encoders are frozen their output is
computed once per caption, so a step runs nothing but the U-Net. Trigger isolation also needs each
caption without the trigger and the empty caption (``Untriggered``).

What the U-Net is conditioned on is a ``Cond``: the text states, and for SDXL also the second encoder's
pooled (projected) output and the six size numbers of each image (``size_ids``), as SDXL was trained:
the prompt states are both encoders' penultimate layers side by side (768 + 1280 = 2048 for SDXL 1.0),
and the empty prompt is all zeros (its pipeline's force_zeros_for_empty_prompt, what guidance subtracts).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from sdlora.data import scan as dataset
from sdlora.training import adapters


class TrainingError(RuntimeError):
    """Training stopped on a problem the user must act on (the message says what)."""


@dataclass
class Cond:
    """What the U-Net is conditioned on, for a batch: text states; SDXL adds pooled text and size ids."""
    hidden: torch.Tensor                      # (B, 77, width)
    pooled: torch.Tensor | None = None        # (B, 1280) SDXL: the second encoder's projected output
    time_ids: torch.Tensor | None = None      # (B, 6) SDXL: original (h, w), crop (top, left), target (h, w)

    def rows(self, idx: torch.Tensor) -> "Cond":
        pick = lambda t: None if t is None else t[idx]      # noqa: E731
        return Cond(self.hidden[idx], pick(self.pooled), pick(self.time_ids))

    def to(self, device) -> "Cond":
        move = lambda t: None if t is None else t.to(device)   # noqa: E731
        return Cond(self.hidden.to(device), move(self.pooled), move(self.time_ids))

    def with_text(self, text: "Cond") -> "Cond":
        """`text`'s states with this batch's size ids (another caption for the same images)."""
        return Cond(text.hidden, text.pooled, self.time_ids)

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        join = lambda ts: None if ts[0] is None else torch.cat(ts)   # noqa: E731
        return Cond(torch.cat([c.hidden for c in conds]), join([c.pooled for c in conds]),
                    join([c.time_ids for c in conds]))

    def where(self, mask: torch.Tensor, other: "Cond") -> "Cond":
        """Rows of `other` where `mask`, else this one's (text only; the size ids stay)."""
        def mix(a, b):
            if a is None:
                return None
            m = mask.to(a.device).reshape(-1, *[1] * (a.dim() - 1))
            return torch.where(m, b.to(a.dtype), a)
        return Cond(mix(self.hidden, other.hidden), mix(self.pooled, other.pooled), self.time_ids)

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        kw = {"encoder_hidden_states": self.hidden.to(dtype)}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype), "time_ids": self.time_ids.to(dtype)}
        return kw


def size_ids(original: tuple[int, int], bucket: tuple[int, int], flip: bool) -> torch.Tensor:
    """(sides, 6) SDXL size conditioning of an image of `original` (w, h) trained at `bucket` (w, h):
    [orig_h, orig_w, crop_top, crop_left, target_h, target_w] per side, the crop in the resized image's
    px (diffusers' SDXL training scripts and pipeline use this order). The flipped side's crop is mirrored."""
    from sdlora.data.buckets import cover
    (nw, _), (left, top) = cover(original, bucket)
    sides = [left] + ([nw - bucket[0] - left] if flip else [])
    return torch.tensor([[original[1], original[0], top, x, bucket[1], bucket[0]] for x in sides],
                        dtype=torch.float32)


@dataclass
class Cached:
    """Examples ready for training."""
    latents: list[torch.Tensor]         # per image: (sides, 4, h, w) at its bucket's size; sides 2 with flips
    ids: torch.Tensor                   # (N * variants, 77) token ids, image by image; SDXL (N * variants, 2, 77)
    embeds: Cond | None                 # the frozen text encoders' output per caption; None when they train
    groups: list[torch.Tensor]          # image indices per bucket (images of one size), in bucket order
    time_ids: list[torch.Tensor] | None = None   # SDXL: per image (sides, 6), see size_ids


class Batches:
    """Caches examples of one base and draws batches of them."""

    def __init__(self, base, device: torch.device, batch_size: int, flip: bool, text_encoder_trains: bool):
        self.base, self.device, self.batch_size, self.flip = base, device, batch_size, flip
        self.text_encoder_trains = text_encoder_trains
        self.xl = base.text_encoder_2 is not None
        self.zeros_for_empty = self.xl          # SDXL's pipeline conditions the empty prompt on zeros

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), 77) token ids, padded and truncated as the pipeline does; SDXL (len, 2, 77), one row
        per tokenizer (the second pads with "!")."""
        def ids(tok):
            return tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                       return_tensors="pt").input_ids
        if not self.xl:
            return ids(self.base.tokenizer)
        return torch.stack([ids(self.base.tokenizer), ids(self.base.tokenizer_2)], dim=1)

    def encode_text(self, ids: torch.Tensor) -> Cond:
        """The text encoders' output for token ids, as the pipeline conditions on it."""
        ids = ids.to(self.device)
        if not self.xl:
            return Cond(self.base.text_encoder(ids)[0])
        one = self.base.text_encoder(ids[:, 0], output_hidden_states=True)
        two = self.base.text_encoder_2(ids[:, 1], output_hidden_states=True)
        return Cond(torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1), two.text_embeds)

    def frozen_embeds(self, ids: torch.Tensor) -> Cond | None:
        """The text encoders' output for `ids`, computed once; None when the text encoder trains."""
        if self.text_encoder_trains:
            return None
        with torch.no_grad():
            c = self.encode_text(ids)
        return Cond(c.hidden.float(), None if c.pooled is None else c.pooled.float())

    def encode(self, path, size: tuple[int, int]) -> torch.Tensor:
        """(sides, 4, h, w) VAE latents (mean of the posterior, scaled) of one image as trained, at `size`."""
        x = dataset.to_tensor(dataset.load_image(path, size[0], size))[None]
        lat = self.encode_pixels(torch.cat([x, x.flip(-1)]) if self.flip else x)
        if not torch.isfinite(lat).all():
            raise TrainingError(f"the VAE gave non-finite latents for {path}; check the image, "
                                "or use mixed_precision='no' (fp16 VAEs overflow on some images)")
        return lat.float()

    @contextlib.contextmanager
    def vae_as_its_pipeline_runs(self):
        """The base's VAE inside the block, without gradients: a VAE that overflows in fp16 (SDXL 1.0's; its
        config says force_upcast) runs in fp32, as its pipeline decodes; an fp16-safe one stays in fp16."""
        vae = self.base.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        with torch.no_grad():
            if upcast:
                vae.to(torch.float32)
            try:
                yield vae
            finally:
                if upcast:
                    vae.to(torch.float16)

    def encode_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 4, h, w) scaled posterior-mean latents of images x (n, 3, H, W) in -1..1, one at a time."""
        with self.vae_as_its_pipeline_runs() as vae:
            lat = torch.cat([vae.encode(one[None].to(self.device, vae.dtype)).latent_dist.mean for one in x])
        return lat.float() * vae.config.scaling_factor

    def decode_latents(self, lat: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) images in 0..1 of scaled latents (n, 4, h, w), one at a time: with encode_pixels, the
        base VAE's round trip of an image (what a LoRA on the U-Net can give back of it)."""
        with self.vae_as_its_pipeline_runs() as vae:
            x = torch.cat([vae.decode((one[None] / vae.config.scaling_factor).to(self.device, vae.dtype)).sample
                           for one in lat])
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def cache(self, paths: list, captions: list[str], sizes: list[tuple[int, int]],
              originals: list[tuple[int, int]] | None = None) -> Cached:
        """Latents of `paths`, each at its (width, height), and embeddings of `captions` (len(paths) * variants
        of them, image by image); for SDXL the size ids of each image from its `originals` (w, h) size."""
        ids = self.tokenize(captions)
        order = sorted(set(sizes), key=lambda s: s[0] / s[1])
        groups = [torch.tensor([i for i, s in enumerate(sizes) if s == size]) for size in order]
        time_ids = None
        if self.xl:
            time_ids = [size_ids(o, s, self.flip) for o, s in zip(originals or sizes, sizes)]
        embeds = self.frozen_embeds(ids)
        if embeds is not None:
            embeds = self.zero_empty(embeds, ids)
        return Cached([self.encode(p, s) for p, s in zip(paths, sizes)], ids, embeds, groups, time_ids)

    def draw(self, g: torch.Generator, c: Cached) -> tuple[torch.Tensor, Cond, torch.Tensor]:
        """(latents, conditioning, caption indices) of a random batch, all of one bucket: the bucket is
        drawn in proportion to its images (with one bucket, nothing is drawn for it)."""
        members = c.groups[0]
        if len(c.groups) > 1:
            weights = torch.tensor([len(m) for m in c.groups], dtype=torch.float)
            members = c.groups[int(torch.multinomial(weights, 1, generator=g))]
        idx = members[torch.randint(len(members), (self.batch_size,), generator=g)]
        side = torch.randint(c.latents[0].shape[0], (self.batch_size,), generator=g)
        lat = torch.stack([c.latents[i][s] for i, s in zip(idx.tolist(), side.tolist())]).to(self.device)
        sizes = None
        if c.time_ids is not None:
            sizes = torch.stack([c.time_ids[i][s] for i, s in zip(idx.tolist(), side.tolist())]).to(self.device)
        variants = len(c.ids) // len(c.latents)
        if variants > 1:                                  # one of each image's caption variants
            idx = idx * variants + torch.randint(variants, (self.batch_size,), generator=g)
        text = self.embed(idx, c.ids, c.embeds)
        return lat, Cond(text.hidden, text.pooled, sizes), idx

    def embed(self, idx: torch.Tensor, ids: torch.Tensor, embeds: Cond | None, empty: int | None = None) -> Cond:
        """The text conditioning of captions `idx` (cached, or through the training text encoders); `empty`:
        the index of the empty caption, zeros where the pipeline conditions it on zeros."""
        if embeds is not None:
            return embeds.rows(idx).to(self.device)
        return self.zero_empty(self.encode_text(ids[idx]), ids[idx])

    def zero_empty(self, text: Cond, ids: torch.Tensor) -> Cond:
        """`text` with the rows of empty captions (by their token ids) zeroed where the pipeline conditions the
        empty prompt on zeros (SDXL); unchanged otherwise."""
        if not self.zeros_for_empty:
            return text
        return text.where(_empty_ids(ids, self.base.tokenizer),
                          Cond(torch.zeros_like(text.hidden), torch.zeros_like(text.pooled)))


def _empty_ids(ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """Which rows of (B, 2, 77) SDXL token ids are the empty caption: start, end, then padding only."""
    first = ids[:, 0] if ids.dim() == 3 else ids
    return (first[:, 1] == tokenizer.eos_token_id).cpu()


@dataclass
class BasePictures:
    """The frozen base's own picture of each training image's caption without the trigger, and of the empty
    caption, as latents (4, h, w) at that image's bucket: what pass isolation holds those captions on."""
    captioned: list[torch.Tensor]
    empty: list[torch.Tensor]


class Untriggered:
    """Each training caption without the trigger, then the empty caption: the prompts trigger isolation keeps
    as the frozen base draws them."""

    def __init__(self, batches: Batches, captions: list[str], trigger: str):
        self.b = batches
        self.ids = batches.tokenize([dataset.without_trigger(c, trigger) for c in captions] + [""])   # (N + 1, 77)
        self.embeds = batches.frozen_embeds(self.ids)
        if self.embeds is not None:
            self.embeds = batches.zero_empty(self.embeds, self.ids)

    def pick(self, g: torch.Generator, idx: torch.Tensor,
             pictures: BasePictures | None = None) -> tuple[Cond, Cond, torch.Tensor | None]:
        """(text conditioning through the LoRA, that of the frozen base, the latents to hold them on) of each
        batch caption without the trigger, or of the empty caption for half of them (at random). The latents
        are the base's own pictures of those captions (`pictures`), or None: the batch's training images."""
        empty = torch.rand(len(idx), generator=g) < 0.5
        pick = torch.where(empty, torch.full_like(idx, len(self.ids) - 1), idx)
        lat = None
        if pictures is not None:
            variants = (len(self.ids) - 1) // len(pictures.captioned)
            image = (idx // variants).tolist()
            lat = torch.stack([pictures.empty[i] if e else pictures.captioned[i]
                               for i, e in zip(image, empty.tolist())]).to(self.b.device)
        if self.embeds is not None:                       # frozen text encoder: the base's embeddings
            enc = self.embeds.rows(pick).to(self.b.device)
            return enc, enc, lat
        # the base's pass first: turning adapters off and on again flips the LoRA's requires_grad,
        # which must not happen to weights already in this step's graph
        with torch.no_grad(), adapters.adapters_off(*self.b.base.text_encoders.values()):
            frozen = self.b.embed(pick, self.ids, None)
        return self.b.embed(pick, self.ids, None), frozen, lat

    def drop_captions(self, g: torch.Generator, cond: Cond, p: float) -> Cond:
        """`cond` with each example's caption replaced by the empty caption's conditioning with probability p
        (caption dropout, kohya's caption_dropout_rate): the style is also learnt without any words."""
        drop = torch.rand(len(cond.hidden), generator=g) < p
        if not drop.any():
            return cond
        empty = torch.full((len(drop),), len(self.ids) - 1)
        return cond.where(drop, self.b.embed(empty, self.ids, self.embeds))


__all__ = ["BasePictures", "Batches", "Cached", "Cond", "Untriggered", "TrainingError", "size_ids"]
