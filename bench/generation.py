"""Generation benchmark: the base alone, one LoRA unfused and fused, and strength changes.

    python bench/generation.py                             # CPU: 256 px, 4 denoising steps (minutes)
    python bench/generation.py --size 512 --steps 25 --repeats 5
    python bench/generation.py --device cuda               # fp16; 512 px, 25 steps

One ``sdlora.generate.Generator`` on the SD 1.5 architecture with random weights
(``--base sd15-random``) makes the same image (prompt, seed, classifier-free guidance)
three ways: the base alone, with one rank-16 LoRA on the U-Net cross-attention
projections unfused (forward hooks) and fused (weights rewritten). The three alternate
image by image, in a rotating order, so a busy machine slows all alike. Besides seconds
per image, the U-Net's own seconds per denoising step are taken from hooks on the U-Net
(the LoRA only touches the U-Net; the rest is text encoding, scheduler and VAE decode).

A strength change is ``Generator.set_loras`` with the same file at a new strength, the
call the UI makes when a slider moves, timed in both modes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common as C

VARIANTS = ("base", "unfused", "fused")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(p)
    p.add_argument("--size", type=int, default=None, help="px; default 256 on CPU, 512 on GPU")
    p.add_argument("--steps", type=int, default=None, help="denoising steps; default 4 on CPU, 25 on GPU")
    p.add_argument("--repeats", type=int, default=None, help="timed images per variant; default 3 CPU, 5 GPU")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per variant first")
    p.add_argument("--changes", type=int, default=10, help="timed strength changes per mode")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--self-attention", action="store_true", help="LoRA on attn1 too (twice the modules)")
    return p.parse_args()


def write_lora(base, path: Path, rank: int, self_attention: bool) -> int:
    """A random non-zero kohya LoRA file for the base's targeted Linear modules; returns the module count."""
    import torch

    from sdlora.loras import layouts as formats
    from sdlora.training import adapters as lora_mod
    from sdlora.config import LoraSpec
    from sdlora.loras.layouts import LoraWeights
    g = torch.Generator().manual_seed(7)
    loras = {}
    for name in lora_mod.target_names(base.unet, LoraSpec(self_attention=self_attention).unet_targets()):
        m = base.unet.get_submodule(name)                 # Linear: down (r, in), up (out, r)
        loras[f"unet.{name}"] = LoraWeights(down=torch.randn(rank, m.in_features, generator=g) * 0.05,
                                            up=torch.randn(m.out_features, rank, generator=g) * 0.05,
                                            alpha=float(rank))
    formats.save_lora_file(path, formats.to_kohya(loras), {"ss_network_dim": str(rank)})
    return len(loras)


class UnetClock:
    """Seconds inside the U-Net's forward (one call per denoising step, both CFG halves batched).

    Wall seconds on a GPU; process CPU seconds on a CPU, where other load would swamp wall time.
    """

    def __init__(self, unet, device: str):
        self.device, self.seconds, self.calls, self._t = device, 0.0, 0, 0.0
        self.now = time.perf_counter if device == "cuda" else time.process_time
        unet.register_forward_pre_hook(self._start)
        unet.register_forward_hook(self._stop)

    def _start(self, module, args):
        C.sync(self.device)
        self._t = self.now()

    def _stop(self, module, args, output):
        C.sync(self.device)
        self.seconds += self.now() - self._t
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def strength_changes(gen, path: str, fused: bool, n: int, device: str) -> tuple[float, float, list[float]]:
    """Seconds of the first apply (from the base alone) and the median of n strength changes after it."""
    from sdlora.generate import LoraChoice
    gen.set_loras([])
    first = C.timed(lambda: gen.set_loras([LoraChoice(path, 1.0)], fused=fused), device)
    times = [C.timed(lambda s=s: gen.set_loras([LoraChoice(path, s)], fused=fused), device)
             for s in [0.3 + 0.05 * (i % 10) for i in range(n)]]
    return first, C.median(times), times


def run_images(gen, clock: UnetClock, cfg, path: str, args, device: str, mem: C.PeakMemory,
               load: C.LoadLog) -> dict:
    """Images of the three variants in a rotating order; per variant wall, CPU and U-Net seconds, peak memory."""
    import numpy as np

    from sdlora.generate import LoraChoice
    choice = {"base": [], "unfused": [LoraChoice(path, 1.0)], "fused": [LoraChoice(path, 1.0)]}
    res = {k: {v: [] for v in VARIANTS} for k in ("wall", "cpu", "unet")}
    res["peak"], res["image"] = {v: 0 for v in VARIANTS}, {}
    for i in range(args.warmup + args.repeats):
        for v in VARIANTS[i % 3:] + VARIANTS[:i % 3]:
            gen.set_loras(choice[v], fused=v == "fused")            # untimed: a mode switch, not a step
            clock.reset()
            if i == 0:                                   # memory from the first image of each variant
                mem.reset()
            out: list = []
            wall, cpu = C.timed2(lambda out=out: out.append(gen.generate(cfg)), device)
            res["image"][v] = np.asarray(out[0]).astype(np.int16)
            load.sample()
            if i == 0:
                res["peak"][v] = mem.read()
            if i >= args.warmup:
                res["wall"][v].append(wall)
                res["cpu"][v].append(cpu)
                res["unet"][v].append(clock.seconds / clock.calls)
    return res


def per_round(xs: dict, v: str) -> float:
    """Median over rounds of variant / base in the same round."""
    return C.median([t / b for t, b in zip(xs[v], xs["base"])])


def report_images(res: dict, gpu: bool, mem: C.PeakMemory) -> None:
    import numpy as np
    cpu_only = lambda cells: [] if gpu else cells
    headers = (["variant", "s/image"] + cpu_only(["CPU s/image"]) + ["U-Net s/step", "x base (image)"]
               + cpu_only(["x base (CPU)"]) + ["x base (U-Net)", "peak GiB", "image range s"])
    rows = [[v, f"{C.median(res['wall'][v]):.3f}"] + cpu_only([f"{C.median(res['cpu'][v]):.3f}"])
            + [f"{C.median(res['unet'][v]):.4f}", f"{per_round(res['wall'], v):.3f}"]
            + cpu_only([f"{per_round(res['cpu'], v):.3f}"])
            + [f"{per_round(res['unet'], v):.3f}", f"{res['peak'][v] / C.GIB:.2f}", C.spread(res["wall"][v])]
            for v in VARIANTS]
    print(C.table(headers, rows))
    if not gpu:
        print("s/image: wall seconds; CPU s and U-Net s/step: CPU seconds of this process (other load on the "
              "machine does not count there)")
    print(f"memory: {mem.kind}; x base: median of per-round ratios to the base image of the same round")
    img = res["image"]
    print(f"LoRA active: mean |pixel diff| vs base {np.abs(img['fused'] - img['base']).mean():.2f} (fused), "
          f"unfused vs fused {np.abs(img['unfused'] - img['fused']).mean():.2f} (0-255 scale)")


def report_changes(changes: dict, base_image_s: float) -> None:
    rows = [[m, f"{first * 1e3:.1f}", f"{med * 1e3:.1f}", C.spread([t * 1e3 for t in ts]),
             f"{100 * med / base_image_s:.3f}"] for m, (first, med, ts) in changes.items()]
    print(C.table(["strength change", "first apply ms", "change ms", "change range ms", "% of base image"], rows))


def main() -> None:
    args = parse_args()
    device = C.pick_device(args.device)
    C.set_threads(args.threads)
    gpu = device == "cuda"
    args.size = args.size or (512 if gpu else 256)
    args.steps = args.steps or (25 if gpu else 4)
    args.repeats = args.repeats or (5 if gpu else 3)

    from sdlora.config import GenerateConfig
    from sdlora.generate import Generator
    load, mem, base, built_s = C.start(args, device)
    print(f"base {args.base} built in {built_s:.1f} s; {args.size} px, {args.steps} denoising "
          f"steps, guidance 7.5; {args.warmup} warm-up + {args.repeats} timed images per variant")
    gen, clock = Generator(base), UnetClock(base.unet, device)
    cfg = GenerateConfig(prompt="a lighthouse on a cliff at dusk, sks style", seed=0, steps=args.steps,
                         guidance=7.5, width=args.size, height=args.size)
    with tempfile.TemporaryDirectory(prefix="sdlora-bench-") as tmp:
        path = str(Path(tmp) / "style.safetensors")
        modules = write_lora(base, Path(path), args.rank, args.self_attention)
        print(f"LoRA: rank {args.rank} on {modules} U-Net Linear modules, strength 1.0")
        res = run_images(gen, clock, cfg, path, args, device, mem, load)
        changes = {m: strength_changes(gen, path, m == "fused", args.changes, device) for m in ("unfused", "fused")}
        gen.set_loras([])
        load.sample()

    base_image_s = C.median(res["wall"]["base"])
    print()
    report_images(res, gpu, mem)
    print()
    report_changes(changes, base_image_s)
    print()
    for v, target in (("fused", 1.02), ("unfused", 1.15)):
        print(C.verdict(per_round(res["wall"], v), target, f"{v} / base, wall seconds per image"))
        if not gpu:
            print(C.verdict(per_round(res["cpu"], v), target, f"{v} / base, CPU seconds per image"))
    for m, (_, med, _) in changes.items():
        print(C.verdict(100 * med / base_image_s, 2.0, f"{m} strength change, % of one base image", "%"))
    print(load.summary())


if __name__ == "__main__":
    main()
