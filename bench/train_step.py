"""Train-step benchmark: sdlora's full step against a bare U-Net step on the same batch.

    python bench/train_step.py                          # CPU: 256 px, 3 timed steps each (minutes)
    python bench/train_step.py --sizes 256 512 --steps 5
    python bench/train_step.py --device cuda            # fp16; 256 and 512 px, 20 timed steps each

Both steps train the same SD U-Net (random weights, ``--base sd15-random``) with the same
PEFT LoRA adapters (rank 16 on the cross-attention projections, sdlora's default targets),
batch 1, with and without gradient checkpointing.

- ours: ``_Trainer.one_step`` (batch draw, noise, DDPM ``add_noise``, the U-Net under
  accelerate, MSE, backward, AdamW, LR scheduler, ``zero_grad``).
- bare: the least such a step can do. Step i's batch (noisy latents, timestep, the
  cached text embeddings, the target) is drawn beforehand, the very one ``one_step(i)``
  draws; timed are ``unet(...)``, MSE, backward, an AdamW step and ``zero_grad``, with
  no sdlora code (under ``torch.autocast`` and a ``GradScaler`` in fp16, as accelerate does).

The two alternate step by step, ours first on even steps and bare first on odd ones,
so a busy machine slows both alike; figures are medians of the timed steps after the
warm-up, and the ratio is the median of the per-pair ratios ours / bare.
"""
from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import _common as C


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="px; default 256 on CPU, 256 512 on GPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant; default 3 CPU, 20 GPU")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default 1 CPU, 3 GPU")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--checkpointing", nargs="+", choices=("off", "on"), default=["off", "on"])
    p.add_argument("--target-ratio", type=float, default=1.10, help="ours / bare at most this")
    return p.parse_args()


class BareStep:
    """unet -> MSE -> backward -> AdamW -> zero_grad on a batch drawn beforehand; nothing else."""

    def __init__(self, unet, params, batches: list, lr: float, weight_decay: float, fp16: bool):
        import torch
        self.torch = torch
        self.unet, self.batches = unet, batches
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.fp16 = fp16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None

    def __call__(self, step: int) -> None:
        torch = self.torch
        noisy, t, cond, target = self.batches[step]
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
            pred = self.unet(noisy, t, **cond).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def drawn_batches(trainer, n: int) -> list:
    """Steps 0..n-1's batches as ``one_step`` draws them (untimed): noisy latents, t, embeddings, target.

    Both variants then run on identical inputs, step for step, so any difference is the code around the U-Net.
    """
    dtype, out = trainer.base.unet.dtype, []
    for i in range(n):
        g = trainer.step_generator(i, 0)
        lat, cond, _ = trainer.batches.draw(g, trainer.examples)  # (1, 4, px/8, px/8), text (and SDXL's sizes)
        noisy, t, target = trainer.objective.noisy(lat, g)
        out.append((noisy.to(dtype), t, cond.unet_kwargs(dtype), target))
    return out


def make_trainer(base, size: int, args, device: str, work: Path):
    """A ``_Trainer`` on the shared base, set up (latents and embeddings cached, adapters injected)."""
    from sdlora.config import DataConfig, LoraSpec, TrainConfig
    from sdlora.training.loop import Callbacks, _Trainer
    folder = C.make_images(work / f"images{size}", 3, size)
    cfg = TrainConfig(base=args.base, steps=1_000_000, mixed_precision="fp16" if device == "cuda" else "no",
                      use_8bit_adam=False, output_dir=str(work / "out"),   # the bare step uses torch AdamW too
                      trigger_isolation=0.0,         # one U-Net pass, as the bare step (isolation adds a second)
                      sample_every=0)
    trainer = _Trainer(DataConfig(folder=str(folder), resolution=size), LoraSpec(rank=args.rank), cfg,
                       Callbacks(), None, base)
    trainer.setup(work, None)
    return trainer


def measure(trainer, bare: BareStep, args, device: str, mem: C.PeakMemory, load: C.LoadLog) -> dict:
    """Alternate ours and bare; per variant the wall and CPU seconds and the highest peak memory."""
    runs = {"ours": trainer.one_step, "bare": bare}
    wall, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    peak, above = {k: 0 for k in runs}, {k: 0 for k in runs}
    for i in range(args.warmup + args.steps):
        for name in (("ours", "bare") if i % 2 == 0 else ("bare", "ours")):
            if i == 0:                                   # memory from the first step, the highest of a run
                mem.reset()
                floor = mem.now()
            w, c = C.timed2(lambda run=runs[name], i=i: run(i), device)
            load.sample()
            if i == 0:
                peak[name], above[name] = mem.read(), mem.read() - floor
            if i >= args.warmup:
                wall[name].append(w)
                cpu[name].append(c)
    pair = lambda xs: C.median([o / b for o, b in zip(xs["ours"], xs["bare"])])
    return {"wall": wall, "cpu": cpu, "peak": peak, "above": above, "ratio": pair(wall), "cpu_ratio": pair(cpu)}


def row(size: int, ckpt: str, r: dict, on_cpu: bool) -> list:
    o, b = r["wall"]["ours"], r["wall"]["bare"]
    out = [size, ckpt, f"{C.median(o):.3f}", f"{C.median(b):.3f}", f"{r['ratio']:.3f}"]
    if on_cpu:
        out += [f"{C.median(r['cpu']['ours']):.3f}", f"{C.median(r['cpu']['bare']):.3f}", f"{r['cpu_ratio']:.3f}"]
    return out + [f"{r['peak']['ours'] / C.GIB:.2f}", f"{r['peak']['bare'] / C.GIB:.2f}",
                  f"{r['above']['ours'] / C.GIB:.2f}", C.spread(o), C.spread(b)]


def bench_size(base, size: int, args, device: str, work: Path, mem: C.PeakMemory, load: C.LoadLog):
    """Rows and verdicts at one image size, both checkpointing settings on one set-up trainer."""
    gpu = device == "cuda"
    t0 = time.perf_counter()
    trainer = make_trainer(base, size, args, device, work)
    print(f"{size} px: trainer set up in {time.perf_counter() - t0:.1f} s "
          f"({len(trainer.params)} LoRA tensors, {sum(p.numel() for p in trainer.params):,} parameters)")
    bare = BareStep(base.unet, trainer.params, drawn_batches(trainer, args.warmup + args.steps), trainer.cfg.lr,
                    trainer.cfg.weight_decay, gpu)
    rows, verdicts = [], []
    for ckpt in args.checkpointing:
        (base.unet.enable_gradient_checkpointing if ckpt == "on"       # what setup() does for the flag
         else base.unet.disable_gradient_checkpointing)()
        r = measure(trainer, bare, args, device, mem, load)
        rows.append(row(size, ckpt, r, not gpu))
        where = f"at {size} px, checkpointing {ckpt}"
        verdicts.append(C.verdict(r["ratio"], args.target_ratio, f"ours / bare, wall time, {where}"))
        if not gpu:
            verdicts.append(C.verdict(r["cpu_ratio"], args.target_ratio, f"ours / bare, CPU time, {where}"))
    release(trainer, base)
    return rows, verdicts


def release(trainer, base) -> None:
    """Give the base back as it came: no checkpointing, no adapters, no accelerate autocast wrapper."""
    import torch

    from sdlora.training import adapters as lora_mod
    base.unet.disable_gradient_checkpointing()
    trainer.acc.unwrap_model(trainer.unet, keep_fp32_wrapper=False)
    lora_mod.remove_adapters(base.unet)
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    device = C.pick_device(args.device)
    C.set_threads(args.threads)
    gpu = device == "cuda"
    args.sizes = args.sizes or ([256, 512] if gpu else [256])
    args.steps = args.steps or (20 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)

    load, mem, base, built_s = C.start(args, device)
    print(f"base {args.base} built in {built_s:.1f} s; LoRA rank {args.rank}, batch 1, "
          f"{'fp16 weights + autocast' if gpu else 'fp32'}; {args.warmup} warm-up + {args.steps} timed steps each")
    rows, verdicts = [], []
    with tempfile.TemporaryDirectory(prefix="sdlora-bench-") as tmp:
        for size in args.sizes:
            r, v = bench_size(base, size, args, device, Path(tmp), mem, load)
            rows += r
            verdicts += v

    print()
    cpu_cols = ["ours CPU s", "bare CPU s", "CPU ratio"] if not gpu else []
    print(C.table(["px", "ckpt", "ours s/step", "bare s/step", "ours/bare"] + cpu_cols +
                  ["ours peak GiB", "bare peak GiB", "ours +step GiB", "ours range s", "bare range s"], rows))
    if not gpu:
        print("s/step: wall seconds; CPU s: seconds of CPU this process used (other load on the machine does "
              "not count there)")
    print(f"memory: {mem.kind}; '+step' is the peak above what was in use just before the step")
    print()
    print("\n".join(verdicts))
    print(load.summary())


if __name__ == "__main__":
    main()
