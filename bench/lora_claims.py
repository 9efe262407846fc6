"""The LoRA method's claims, measured on Stable Diffusion: parameters, file size, training memory and step time
of LoRA on an fp32 / bf16 / int8 / nf4 base against a full U-Net fine-tune, and what a 4-bit base costs in
learning.

    python bench/lora_claims.py                        # CPU: SD 1.5 architecture (random weights), 256 and 512 px
    python bench/lora_claims.py --sizes 256 --steps 1  # quicker
    python bench/lora_claims.py --learning             # also: the style test on `tiny`, nf4 vs fp32 base
    python bench/lora_claims.py --device cuda          # on a GPU

Each (variant, size) runs in a child process of its own, so one variant's memory never hides in another's
peak. A child builds the SD 1.5 U-Net (``--base``), keeps it in the variant's precision, adds what trains
(LoRA adapters of sdlora's defaults, rank ``--rank`` on the cross-attention projections, through the same
``sdlora.bases.load`` and ``sdlora.training.adapters`` the trainer uses; or every U-Net weight for the full
fine-tune), turns gradient checkpointing on, and runs AdamW steps at batch 1 on random latents and text states.
Peak memory is ``PeakMemory`` (GPU max allocated, or peak RSS on a CPU) from after the set-up (the model as
kept, with malloc_trim'd free memory handed back) to the end of the steps: weights + gradients + optimizer
state + activations, what the paper's "training memory" counts. Step times are medians after a warm-up step;
each variant's ratio is against the fp32-base LoRA step of the same size.

Targets (issue: low-bit base): LoRA peak at most 1/3 of the full fine-tune's (the paper's 3x); an nf4 base's
LoRA peak at most 0.5x the fp32 base's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

VARIANTS = ("full", "lora-fp32", "lora-bf16", "lora-int8", "lora-nf4", "lora-fp32-nockpt")
DEFAULT_VARIANTS = VARIANTS[:5]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_device_args(p)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and size (after 1 warm-up)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (sdlora's default for 8-30 images)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT_VARIANTS),
                   help="-nockpt: without gradient checkpointing (the others have it on)")
    p.add_argument("--learning", action="store_true", help="also train the style test on tiny: nf4 vs fp32 base")
    p.add_argument("--no-files", action="store_true", help="skip the file-size figures (they build the base once more)")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    return p.parse_args()


# ---- one variant, in its own process -------------------------------------------------------------------

def child(args, variant: str, size: int) -> dict:
    import torch

    from sdlora.bases.load import load_base
    from sdlora.config import LoraSpec
    from sdlora.training import adapters
    from sdlora.training.hardware import PeakMemory
    device = args.device
    compute = torch.float16 if device == "cuda" else torch.float32
    precision = "fp32" if variant == "full" else variant.split("-")[1]
    own = PeakMemory(device)
    own.reset()
    runtime = own.now()                      # the process before any model: Python, torch, the libraries
    base = load_base(args.base, dtype=compute, device=device, fresh=True, precision=precision)
    unet = base.unet
    del base                                 # the VAE and text encoder are not part of a step (cached inputs)
    if variant == "full":
        params = [p for p in unet.parameters()]
        for p in params:
            p.requires_grad_(True)
    else:
        adapters.inject(unet, None, LoraSpec(rank=args.rank))
        params = adapters.lora_parameters(unet)
        for p in params:
            p.data = p.data.float()
    if not variant.endswith("-nockpt"):
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    width = unet.config.cross_attention_dim
    dtype = next(p.dtype for p in unet.parameters() if p.dtype.is_floating_point)
    def extra() -> dict:
        """SDXL's pooled text and size ids (random: a step's cost does not depend on their values)."""
        if unet.config.addition_embed_type != "text_time":
            return {}
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        return {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
                                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype,
                                                               device=device)}}
    batches = [(torch.randn(1, 4, latent, latent, generator=g).to(device, dtype),
                torch.randint(0, 1000, (1,), generator=g).to(device),
                torch.randn(1, 77, width, generator=g).to(device, dtype), extra(),
                torch.randn(1, 4, latent, latent, generator=g).to(device)) for _ in range(args.steps + 1)]

    def step(i: int) -> None:
        x, t, enc, kw, target = batches[i]
        with torch.autocast("cuda", dtype=torch.float16, enabled=device == "cuda"):
            pred = unet(x, t, enc, **kw).sample
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mem = PeakMemory(device)
    mem.reset()
    floor = mem.now()
    times = []
    for i in range(args.steps + 1):
        wall, _ = C.timed2(lambda: step(i), device)
        if i:
            times.append(wall)
    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in unet.parameters() if p.dtype.is_floating_point) + _packed_params(unet)
    return {"variant": variant, "size": size, "peak": mem.read(), "kept": floor, "runtime": runtime,
            "step_s": C.median(times),
            "steps": times, "trainable": trainable, "unet_params": total, "precision": precision}


def _packed_params(unet) -> int:
    """Weights held by quantised layers (their packed storage is not a floating-point parameter)."""
    from sdlora.bases.precision import is_quantized
    return sum(m.in_features * m.out_features for m in unet.modules() if is_quantized(m))


# ---- the parent: children, file sizes, the table ----------------------------------------------------------

def run_child(args, variant: str, size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, str(size), "--base", args.base, "--device", args.device,
           "--steps", str(args.steps), "--rank", str(args.rank), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("{")), None)
    if out.returncode or line is None:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "size": size, "error": " | ".join(tail)}
    return json.loads(line)


def file_sizes(args) -> tuple[int, int, int]:
    """(bytes of sdlora's exported LoRA at the default rank, of the U-Net in fp16, LoRA trainable parameters)."""
    import torch

    from sdlora.bases.load import load_base
    from sdlora.config import LoraSpec
    from sdlora.loras import layouts
    from sdlora.training import adapters
    base = load_base(args.base, fresh=True)
    unet_fp16 = sum(p.numel() * 2 for p in base.unet.parameters())
    spec = LoraSpec(rank=args.rank)
    adapters.inject(base.unet, None, spec)
    loras = adapters.extract(base.unet, "unet", spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        layouts.save_lora_file(path, layouts.to_kohya(loras, dtype=torch.float16), {})
        size = path.stat().st_size
    return size, unet_fp16, sum(w.up.numel() + w.down.numel() for w in loras.values())


def learning(args) -> list[str]:
    """bench/style_quality.py's figures on neon for a LoRA trained on an nf4 and an fp32 `tiny`."""
    lines, root = [], C.ROOT
    for precision in ("fp32", "nf4"):
        t0 = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            figs = Path(tmp) / "figures.json"
            out = subprocess.run([sys.executable, str(root / "bench" / "style_quality.py"), "--styles", "neon",
                                  "--set", f'base_precision="{precision}"', "--json", str(figs), "--runs", tmp],
                                 capture_output=True, text=True, cwd=root)
            if out.returncode or not figs.is_file():
                lines.append(f"  {precision}: failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
                continue
            row = json.loads(figs.read_text())[0]
            losses = _losses(Path(row["lora"]).parent)
        stats = "; ".join(f"{k} {v['way'][-1]:.0%} of the way, untriggered {v['untriggered']:.2f}x"
                          for k, v in row["stats"].items())
        lines.append(f"  {precision} base: {stats}; colour kept {row['colour_kept']:.0%}; loss mean of steps "
                     f"1-100 {losses[0]:.4f}, last 100 {losses[1]:.4f}; {time.time() - t0:.0f} s with drawing")
    return lines


def _losses(run_dir: Path) -> tuple[float, float]:
    rows = [r.split(",") for r in (run_dir / "log.csv").read_text().splitlines()[1:] if r]
    loss = [float(r[1]) for r in rows]
    return sum(loss[:100]) / len(loss[:100]), sum(loss[-100:]) / len(loss[-100:])


def net(row: dict) -> int:
    """A child's peak above its own runtime (on a GPU the allocator counts tensors only: nothing to take off)."""
    return row["peak"] - row.get("runtime", 0) if row.get("runtime") is not None else row["peak"]


def main() -> None:
    args = parse_args()
    args.device = C.pick_device(args.device)
    C.set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args, args.child[0], int(args.child[1]))))
        return
    print(C.describe_machine(args.device))
    load = C.LoadLog()
    # the file-size figures build the whole base once more in fp32: skipped for SDXL (14 GB) when --no-files
    lora_bytes, unet_fp16, lora_params = file_sizes(args) if not args.no_files else (0, 0, 0)
    rows = {}
    for size in args.sizes:
        for variant in args.variants:
            rows[variant, size] = run_child(args, variant, size)
            load.sample()
            r = rows[variant, size]
            print(f"  {variant} {size} px: " + (r.get("error") or f"peak {r['peak'] / C.GIB:.2f} GiB, "
                                                f"step {r['step_s']:.1f} s"), flush=True)
    full = next((r for r in rows.values() if r["variant"] == "full" and "error" not in r), None)
    lora_params = lora_params or next((r["trainable"] for r in rows.values() if "trainable" in r and
                                       r["variant"] != "full"), 0)
    print(f"\nbase {args.base}, LoRA rank {args.rank} on attn2 q/k/v/out, batch 1, gradient checkpointing (not in "
          "-nockpt), AdamW")
    if full:
        print(f"trainable parameters: LoRA {lora_params:,} vs full U-Net {full['trainable']:,} "
              f"(1/{full['trainable'] / lora_params:,.0f})")
    if lora_bytes:
        print(f"file: LoRA {lora_bytes / 2**20:.2f} MiB (fp16, kohya) vs the U-Net's weights in fp16 "
              f"{unet_fp16 / 2**30:.2f} GiB (1/{unet_fp16 / lora_bytes:,.0f})")
    print()
    table = []
    for (variant, size), r in rows.items():
        if "error" in r:
            table.append([variant, size, "failed", "", "", "", r["error"][:60]])
            continue
        ref = rows.get(("lora-fp32", size), {})
        ratio = net(r) / net(ref) if "peak" in ref else float("nan")
        speed = r["step_s"] / ref["step_s"] if "step_s" in ref else float("nan")
        full_row = rows.get(("full", size), {})
        vs_full = net(r) / net(full_row) if "peak" in full_row else float("nan")
        table.append([variant, size, f"{r['peak'] / C.GIB:.2f}", f"{net(r) / C.GIB:.2f}", f"{r['kept'] / C.GIB:.2f}",
                      f"{vs_full:.2f}", f"{ratio:.2f}", f"{r['step_s']:.2f} ({speed:.2f}x)"])
    print(C.table(["variant", "px", "peak RSS GiB", "training GiB", "at start GiB", "training / full",
                   "training / lora-fp32", "step s (/ lora-fp32)"], table))
    runtimes = [r["runtime"] for r in rows.values() if "runtime" in r]
    if runtimes:
        print(f"training = peak minus the process's own memory before any model was loaded "
              f"({min(runtimes) / C.GIB:.2f}-{max(runtimes) / C.GIB:.2f} GiB of Python, torch and libraries): what the "
              "paper's training memory counts (weights, gradients, optimizer state, activations)")
    print()
    for size in args.sizes:
        f, l32, nf4 = (rows.get((v, size), {}) for v in ("full", "lora-fp32", "lora-nf4"))
        if "peak" in f and "peak" in l32:
            print(C.verdict(net(l32) / net(f), 1 / 3, f"{size} px: LoRA (fp32 base) training memory / full fine-tune"))
        if "peak" in nf4 and "peak" in l32:
            print(C.verdict(net(nf4) / net(l32), 0.5, f"{size} px: LoRA nf4 base training memory / fp32 base"))
    if args.learning:
        print("\nlearning, the style test (datasets/neon, defaults, `tiny`), LoRA trained on a base kept in:")
        print("\n".join(learning(args)))
    print(load.summary())


if __name__ == "__main__":
    main()
