"""A run's training examples: latents and text embeddings cached once, and random batches of them.

Latents are encoded once per image (and per flip); while the text encoder is frozen its output is
computed once per caption, so a step runs nothing but the U-Net. Trigger isolation also needs each
caption without the trigger and the empty caption (``Untriggered``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sdlora.data import scan as dataset
from sdlora.training import adapters


class TrainingError(RuntimeError):
    """Training stopped on a problem the user must act on (the message says what)."""


@dataclass
class Cached:
    """Examples ready for training."""
    latents: list[torch.Tensor]         # per image: (sides, 4, h, w) at its bucket's size; sides 2 with flips
    ids: torch.Tensor                   # (N * variants, 77) token ids, image by image
    embeds: torch.Tensor | None         # (N * variants, 77, width) frozen text-encoder output; None when it trains
    groups: list[torch.Tensor]          # image indices per bucket (images of one size), in bucket order


class Batches:
    """Caches examples of one base and draws batches of them."""

    def __init__(self, base, device: torch.device, batch_size: int, flip: bool, text_encoder_trains: bool):
        self.base, self.device, self.batch_size, self.flip = base, device, batch_size, flip
        self.text_encoder_trains = text_encoder_trains

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(len(captions), 77) token ids, padded and truncated as the pipeline does."""
        tok = self.base.tokenizer
        return tok(captions, padding="max_length", truncation=True, max_length=tok.model_max_length,
                   return_tensors="pt").input_ids

    def frozen_embeds(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The text encoder's output for `ids`, computed once; None when the text encoder trains."""
        if self.text_encoder_trains:
            return None
        with torch.no_grad():
            return self.base.text_encoder(ids.to(self.device))[0].float()

    def encode(self, path, size: tuple[int, int]) -> torch.Tensor:
        """(sides, 4, h, w) VAE latents (mean of the posterior, scaled) of one image as trained, at `size`."""
        vae = self.base.vae
        with torch.no_grad():
            x = dataset.to_tensor(dataset.load_image(path, size[0], size))[None].to(self.device, vae.dtype)
            sides = [x, x.flip(-1)] if self.flip else [x]
            lat = torch.cat([vae.encode(s).latent_dist.mean for s in sides]) * vae.config.scaling_factor
        if not torch.isfinite(lat).all():
            raise TrainingError(f"the VAE gave non-finite latents for {path}; check the image, "
                                "or use mixed_precision='no' (fp16 VAEs overflow on some images)")
        return lat.float()

    def cache(self, paths: list, captions: list[str], sizes: list[tuple[int, int]]) -> Cached:
        """Latents of `paths`, each at its (width, height), and embeddings of `captions` (len(paths) * variants
        of them, image by image)."""
        ids = self.tokenize(captions)
        order = sorted(set(sizes), key=lambda s: s[0] / s[1])
        groups = [torch.tensor([i for i, s in enumerate(sizes) if s == size]) for size in order]
        return Cached([self.encode(p, s) for p, s in zip(paths, sizes)], ids, self.frozen_embeds(ids), groups)

    def draw(self, g: torch.Generator, c: Cached) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, text embeddings, caption indices) of a random batch, all of one bucket: the bucket is
        drawn in proportion to its images (with one bucket, nothing is drawn for it)."""
        members = c.groups[0]
        if len(c.groups) > 1:
            weights = torch.tensor([len(m) for m in c.groups], dtype=torch.float)
            members = c.groups[int(torch.multinomial(weights, 1, generator=g))]
        idx = members[torch.randint(len(members), (self.batch_size,), generator=g)]
        side = torch.randint(c.latents[0].shape[0], (self.batch_size,), generator=g)
        lat = torch.stack([c.latents[i][s] for i, s in zip(idx.tolist(), side.tolist())]).to(self.device)
        variants = len(c.ids) // len(c.latents)
        if variants > 1:                                  # one of each image's caption variants
            idx = idx * variants + torch.randint(variants, (self.batch_size,), generator=g)
        return lat, self.embed(idx, c.ids, c.embeds), idx

    def embed(self, idx: torch.Tensor, ids: torch.Tensor, embeds: torch.Tensor | None) -> torch.Tensor:
        if embeds is not None:
            return embeds[idx].to(self.device)
        return self.base.text_encoder(ids[idx].to(self.device))[0]


class Untriggered:
    """Each training caption without the trigger, then the empty caption: the prompts trigger isolation keeps
    as the frozen base draws them."""

    def __init__(self, batches: Batches, captions: list[str], trigger: str):
        self.b = batches
        self.ids = batches.tokenize([dataset.without_trigger(c, trigger) for c in captions] + [""])   # (N + 1, 77)
        self.embeds = batches.frozen_embeds(self.ids)

    def pick(self, g: torch.Generator, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings through the LoRA, embeddings of the frozen base) of each batch caption without the
        trigger, or of the empty caption for half of them (at random)."""
        empty = torch.rand(len(idx), generator=g) < 0.5
        pick = torch.where(empty, torch.full_like(idx, len(self.ids) - 1), idx)
        if self.embeds is not None:                       # frozen text encoder: the base's embeddings
            enc = self.embeds[pick].to(self.b.device)
            return enc, enc
        te = self.b.base.text_encoder
        # the base's pass first: turning adapters off and on again flips the LoRA's requires_grad,
        # which must not happen to weights already in this step's graph
        with torch.no_grad(), adapters.adapters_off(te):
            frozen = te(self.ids[pick].to(self.b.device))[0]
        return self.b.embed(pick, self.ids, None), frozen


    def drop_captions(self, g: torch.Generator, enc: torch.Tensor, p: float) -> torch.Tensor:
        """`enc` with each example's caption replaced by the empty caption's embedding with probability p
        (caption dropout, kohya's caption_dropout_rate): the style is also learnt without any words."""
        drop = torch.rand(len(enc), generator=g) < p
        if not drop.any():
            return enc
        empty = torch.full((int(drop.sum()),), len(self.ids) - 1)
        enc = enc.clone()
        enc[drop] = self.b.embed(empty, self.ids, self.embeds).to(enc.dtype)
        return enc


__all__ = ["Batches", "Cached", "Untriggered", "TrainingError"]
