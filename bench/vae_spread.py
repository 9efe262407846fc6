"""VAE spread: what the tiny base's VAE gives back, build to build and setting to setting.

A base's VAE learns from its build's scenes and seed, and what it keeps sets every style's ceiling (the most a
LoRA on the U-Net can be asked for: bench/style_quality.py). Two builds that differ in a setting also differ in
their seed's draws, so one build per setting cannot tell the setting's effect from chance. This trains only the
build's VAE stages (`sdlora.tinybase.build.vae_stages`, then the decoder's refinement when the settings have one)
for each seed, the build's settings with `--set` over them (as `python -m sdlora.tinybase build --set`), and
prints per seed, beside a built base's VAE (`--base`, default the built-in base):

- the scenes' reconstruction (PSNR, dB) and how often the judge reads back their colour and shape,
- the texture energy kept at each scale (the model card's table) and the 0- and 45-degree lines' direction kept,
- each example style's ceiling: the judged prompts drawn in the style, through the VAE and back, read by the
  style's statistic (hatch's lines: 143 before the round trip).

A seed's VAE is the one a build with those settings and seed makes (about a quarter of a build's time), so seed 0
of the built-in base's settings gives its card's figures.

    python bench/vae_spread.py --seeds 0 1 2 --json a.json                      # the built-in base's settings
    python bench/vae_spread.py --seeds 0 1 --set tint_p=0.3 --label tints --json b.json
    python bench/vae_spread.py --merge a.json b.json                           # one table
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.style_quality import judged_colours, styled_and_ceiling, styles  # noqa: E402
from sdlora.tinybase import stylestats  # noqa: E402

BUILT_IN = ROOT / "sdlora" / "base_model"
TEXTURE_SCALES = ("4", "6", "8")          # px: the card's table has 2 and 3 too, where every VAE keeps little


def figures(vae, images, mean) -> dict[str, float]:
    """A VAE's figures, flat: name -> value (see the module's docstring)."""
    from sdlora.tinybase.build import vae_figures
    card = vae_figures(vae, images, mean)
    out = {"PSNR of the scenes (dB)": card["psnr_db"], "judge agrees on the scenes": card["judge_agreement"]}
    for kind, kept in card["texture_kept"].items():
        for scale in TEXTURE_SCALES:
            out[f"{kind} {scale} px: texture kept"] = kept[scale]
    for angle, kept in card["lines_kept"].items():
        for period, value in kept.items():
            out[f"lines {angle} deg, {period} px: direction kept"] = value
    for style in styles():
        styled, ceiling = styled_and_ceiling(vae, style)
        colours = judged_colours(style)
        for name, stat in stylestats.STYLE_STATS[style].items():
            out[f"{style} {name}: ceiling (styled {stylestats.mean_stat(stat, styled, colours):.3f})"] = \
                stylestats.mean_stat(stat, ceiling, colours)
    return out


def train_seed(cfg) -> dict[str, float]:
    """Train the build's VAE stages for `cfg` (its seed included) and measure them."""
    import torch
    from transformers import CLIPTokenizer

    from sdlora.tinybase.build import training_images, vae_stages
    from sdlora.tinybase.models import TOKENIZER_DIR
    from sdlora.tinybase.stages import refine_decoder
    torch.manual_seed(cfg.seed)                     # as build(): the VAE's initial weights come from it
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    images, _, vae_images = training_images(cfg, tokenizer)
    vae, mean, _, _ = vae_stages(cfg, images, vae_images)
    if cfg.refine_steps:
        vae = refine_decoder(cfg, vae, vae_images)
    return figures(vae, images, mean)


def base_figures(folder: Path) -> dict[str, float]:
    """A built base's VAE, measured as train_seed measures a trained one (on its build's first 64 scenes)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    from sdlora.tinybase.build import load_build_config
    from sdlora.tinybase.models import TOKENIZER_DIR
    from sdlora.tinybase.stages import encode_latents
    from sdlora.tinybase.words import make_dataset
    if not (folder / "build.json").is_file() or not (folder / "vae").is_dir():
        raise SystemExit(f"--base {folder}: not a base built by `python -m sdlora.tinybase build` (no build.json or "
                         "vae/); give the folder of one, or --base none")
    cfg = replace(load_build_config(folder), n_images=64, free_captions=0)
    images, _ = make_dataset(cfg, CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32).eval()
    return figures(vae, images, encode_latents(vae, images)[0])


def table(columns: dict[str, dict[str, float]], trained: list[str]) -> str:
    """One row per figure, one column per VAE, and per settings with several trained seeds the range over them
    (a trained column is named "<label>, seed <n>": seeds of other settings are not one spread)."""
    names = list(dict.fromkeys(n for col in columns.values() for n in col))
    groups: dict[str, list[str]] = {}
    for column in trained:
        groups.setdefault(column.rpartition(", seed ")[0], []).append(column)
    spreads = [group for group in groups.values() if len(group) > 1]
    head = ["figure", *columns] + ["range over " + ", ".join(group) for group in spreads]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        row = [name] + [f"{columns[c][name]:.3f}" if name in columns[c] else "-" for c in columns]
        for group in spreads:
            vals = [columns[c][name] for c in group if name in columns[c] and math.isfinite(columns[c][name])]
            row.append(f"{max(vals) - min(vals):.3f}" if vals else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def load_reports(paths: list[Path]) -> tuple[dict, list[str]]:
    """The columns and trained columns of --json reports, in order; SystemExit naming a file that is not one, or
    two reports that name the same column."""
    columns, trained = {}, []
    for path in paths:
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            cols, spread = report["columns"], report["trained"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"--merge {path}: not a report written by vae_spread.py --json ({err})") from None
        for name, col in cols.items():
            if name in columns and columns[name] != col:
                raise SystemExit(f"--merge {path}: column {name!r} is in an earlier report with other figures; give "
                                 "each run its own --label")
            columns[name] = col
        trained += [c for c in spread if c not in trained]
    return columns, trained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="build seeds to train (default 0 1)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="a BuildConfig field over the built-in base's settings, as `tinybase build --set`")
    parser.add_argument("--label", default="", help="the columns' name before the seed (default: the --set items)")
    parser.add_argument("--base", default=str(BUILT_IN),
                        help="a built base whose VAE is shown beside (default the built-in base; 'none': no column)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="also write every figure here (what --merge reads)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: print the --json reports of several runs as one table")
    a = parser.parse_args(argv)
    if a.json and a.json.exists():
        parser.error(f"--json {a.json}: the file exists; give a new name (a report is not overwritten)")
    if a.merge:
        columns, trained = load_reports(a.merge)
    else:
        import torch

        from sdlora.tinybase.build import parse_sets
        from sdlora.tinybase.models import BuildConfig
        try:
            sets = parse_sets(a.set)
        except ValueError as err:
            parser.error(str(err))
        if "seed" in sets:
            parser.error("give build seeds with --seeds, not --set seed=...")
        if len(set(a.seeds)) != len(a.seeds):
            parser.error(f"--seeds {' '.join(map(str, a.seeds))}: each seed once")
        torch.set_num_threads(a.threads)
        label = a.label or " ".join(a.set) or "built-in settings"
        columns = {}
        if a.base != "none":
            columns[f"base {Path(a.base).name}"] = base_figures(Path(a.base))
        trained = []
        for seed in a.seeds:
            t0 = time.time()
            name = f"{label}, seed {seed}"
            columns[name] = train_seed(replace(BuildConfig(), **sets, seed=seed, threads=a.threads))
            trained.append(name)
            print(f"{name}: {(time.time() - t0) / 60:.1f} min", flush=True)
    print(table(columns, trained))
    if a.json:
        tmp = a.json.with_name(f".{a.json.name}.tmp")
        tmp.write_text(json.dumps({"columns": columns, "trained": trained}, indent=2) + "\n", encoding="utf-8")
        tmp.replace(a.json)


if __name__ == "__main__":
    main()
