"""The built-in base's captions and words: the scene captions, made-up words, and the text encoder's
word read-back loss (`WordIdentity`) that keeps each word's identity in its output."""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlora.tinybase import scenes
from sdlora.tinybase.models import CLIP_VOCAB, BuildConfig


def caption_words(outlines: bool = True, tints: bool = False, stripes: bool = False) -> set[str]:
    """Every word of the scenes' captions ('outline' only when the build draws outlines, 'pale' and 'dark' when it
    tints, the stripes' angles and widths when it names them)."""
    return {w for phrase in [*scenes.COLOURS, *scenes.SHAPES, *scenes.SIZES, *scenes.POSITIONS,
                             *scenes.BACKGROUNDS, *scenes.TEXTURES, "a on background and", "outline" * outlines,
                             *(scenes.TINTS if tints else ()),
                             *([*scenes.STRIPE_ANGLES.values(), *scenes.STRIPE_WIDTHS.values()] if stripes else ())]
            for w in phrase.split()}


def made_up_word_parts(tokenizer: CLIPTokenizer, outlines: bool = True, tints: bool = False,
                       stripes: bool = False) -> list[str]:
    """Whole-word vocabulary entries (3-8 ascii letters) that are not words of the scenes' captions."""
    scene_words = caption_words(outlines, tints, stripes)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return [t[:-4] for t, _ in vocab if t.endswith("</w>") and t[:-4].isascii() and t[:-4].isalpha()
            and 3 <= len(t) - 4 <= 8 and t[:-4] not in scene_words]


def caption_token_ids(tokenizer: CLIPTokenizer, tints: bool = False, stripes: bool = False) -> torch.Tensor:
    """Ids of every token the scenes' captions use (and the special tokens)."""
    ids = {i for w in [*caption_words(tints=tints, stripes=stripes), ","] for i in tokenizer(w).input_ids}
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
    parts = made_up_word_parts(tokenizer, outlines=cfg.outline_p > 0, tints=cfg.tint_p > 0,
                               stripes=cfg.stripe_words) if cfg.free_captions else []
    meaning = WordMeaning(cfg, tokenizer) if cfg.prefix_meaning else None
    images, captions = [], []
    for _ in range(cfg.n_images):
        scene = scenes.random_scene(rng, outline_p=cfg.outline_p, texture_p=cfg.texture_p,
                                    texture_shades=tuple(cfg.texture_shades), outline_widths=tuple(cfg.outline_widths),
                                    tint_p=cfg.tint_p, backdrop_p=cfg.backdrop_p,
                                    stripe_words=cfg.stripe_words)
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
    free[caption_token_ids(tokenizer, tints=cfg.tint_p > 0, stripes=cfg.stripe_words)] = False
    with torch.no_grad():
        weight[free] = table[free]
    weight.register_hook(lambda grad: grad.masked_fill(free[:, None], 0.0))
    return weight
