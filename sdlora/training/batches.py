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
    latents: torch.Tensor               # (N, sides, 4, h, w): one per image, and its mirror image with flips
    ids: torch.Tensor                   # (N * variants, 77) token ids, image by image
    embeds: torch.Tensor | None         # (N * variants, 77, width) frozen text-encoder output; None when it trains


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

    def encode(self, paths: list, resolution: int) -> torch.Tensor:
        """(N, sides, 4, h, w) VAE latents (mean of the posterior, scaled) of each image as trained."""
        vae, latents = self.base.vae, []
        with torch.no_grad():
            for path in paths:
                x = dataset.to_tensor(dataset.load_image(path, resolution))[None].to(self.device, vae.dtype)
                sides = [x, x.flip(-1)] if self.flip else [x]
                lat = torch.cat([vae.encode(s).latent_dist.mean for s in sides]) * vae.config.scaling_factor
                if not torch.isfinite(lat).all():
                    raise TrainingError(f"the VAE gave non-finite latents for {path}; check the image, "
                                        "or use mixed_precision='no' (fp16 VAEs overflow on some images)")
                latents.append(lat.float())
        return torch.stack(latents)

    def cache(self, paths: list, captions: list[str], resolution: int) -> Cached:
        """Latents of `paths` and embeddings of `captions` (len(paths) * variants of them, image by image)."""
        ids = self.tokenize(captions)
        return Cached(self.encode(paths, resolution), ids, self.frozen_embeds(ids))

    def draw(self, g: torch.Generator, c: Cached) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, text embeddings, caption indices) of a random batch."""
        idx = torch.randint(len(c.latents), (self.batch_size,), generator=g)
        side = torch.randint(c.latents.shape[1], (self.batch_size,), generator=g)
        lat = c.latents[idx, side].to(self.device)
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


__all__ = ["Batches", "Cached", "Untriggered", "TrainingError"]
