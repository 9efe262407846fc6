"""The whole U-Net fine-tuned on a style: what the base can learn of it at all, beside what a LoRA learns.

style_quality's `--whole-unet` trains, after each sdlora run, every weight of the base's U-Net (no adapters, no
trigger isolation) on the same captions, images, steps and training seed, and judges it as a LoRA is judged:
strength s draws with the U-Net at W + s x (W' - W), W' the fine-tuned weights. Its way at 1 says how far this
base gets toward a style from these images and steps when nothing limits which weights move (at one learning
rate: on some styles a LoRA's few weights learn faster). Where the whole U-Net falls short too, the style is at
the edge of what the base learns from the data, not held back by where a LoRA's adapters sit; where it draws
the style and the LoRA does not, it also shows what moving every prompt (the empty one guidance subtracts
included) buys.
"""
from __future__ import annotations

import time
from pathlib import Path

LR = 1e-4          # AdamW on the full weights (sdlora's 3e-3 is a LoRA rate at alpha = rank)


def train_whole_unet(base, folder: Path, captions: dict, steps: int, seed: int, lr: float = LR,
                     resolution: int = 64) -> tuple[dict, float]:
    """(name -> W' - W for every U-Net weight, seconds): `steps` AdamW steps at batch 1 on the images of
    `folder` named by `captions` (file name -> caption, the trigger in it), the denoising loss as sdlora's
    training noises and targets it (Objective.noisy: the base's schedule and prediction type). The base's
    U-Net is left as it was."""
    import torch
    import torch.nn.functional as F

    from sdlora.config import TrainConfig
    from sdlora.training.batches import Batches
    from sdlora.training.objective import Objective
    unet = base.unet
    device = next(unet.parameters()).device
    batches = Batches(base, device, batch_size=1, flip=False, text_encoder_trains=False)
    names = list(captions)
    latents = torch.cat([batches.encode(folder / n, (resolution, resolution)) for n in names])
    text = batches.frozen_embeds(batches.tokenize([captions[n] for n in names])).hidden
    objective = Objective(base.noise_scheduler(), base.prediction_type, TrainConfig(), unet.dtype)
    before = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    params = [p for p in unet.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    unet.train()
    try:
        for _ in range(steps):
            i = torch.randint(len(names), (1,), generator=g)
            noisy, t, target = objective.noisy(latents[i].to(device), g)
            pred = unet(noisy, t, encoder_hidden_states=text[i].to(device, unet.dtype)).sample
            loss = F.mse_loss(pred.float(), target.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = unet.state_dict()
        delta = {k: (after[k].float() - before[k].float()).cpu() for k in before if before[k].is_floating_point()}
    finally:
        unet.load_state_dict(before)
        unet.eval()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return delta, time.time() - t0


class WholeUnetDrawing:
    """A generator that draws a fine-tuned U-Net as style_quality's judge draws a LoRA: `generate(cfg, [choice])` or
    `generate_many(cfgs, [choice])` with choice.path a file saved by `save` draws at W + choice.strength x its weight
    changes; a LoRA-free call draws the base."""

    def __init__(self, gen):
        self.gen, self.base = gen, gen.base
        self.original = {k: v.detach().clone() for k, v in gen.base.unet.state_dict().items()}
        self.deltas: dict[str, dict] = {}
        self.at: tuple[str, float] | None = None

    def save(self, delta: dict, path: Path) -> str:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in delta.items()}, str(path), metadata={"sdlora_whole_unet": "1"})
        self.deltas = {str(path): delta}          # the one being judged: a U-Net's worth of weights each
        return str(path)

    def put(self, path: str | None, strength: float) -> None:
        """The U-Net's weights at W + strength x the changes in `path` (None or 0: the base's own)."""
        key = None if path is None or strength == 0 else (path, strength)
        if key == self.at:
            return
        state = dict(self.original)              # load_state_dict copies: the originals stay as they are
        if key is not None:
            for k, d in self.deltas[path].items():
                state[k] = (state[k].float() + strength * d.to(state[k].device)).to(state[k].dtype)
        self.base.unet.load_state_dict(state)
        self.at = key

    def generate(self, cfg, choices=None):
        return self.generate_many([cfg], choices)[0]

    def generate_many(self, cfgs, choices=None):
        choice = choices[0] if choices else None
        self.gen.set_loras([])              # no LoRA hooks (nor a fused LoRA's saved weights) under the U-Net's
        self.put(None if choice is None else choice.path, 0.0 if choice is None else choice.strength)
        return self.gen.generate_many(cfgs, [])

    def restore(self) -> None:
        """The base's own U-Net, with no LoRA set: what training and every other trainer's judging start from."""
        self.gen.set_loras([])
        self.put(None, 0.0)


__all__ = ["train_whole_unet", "WholeUnetDrawing", "LR"]
