"""Spec: bench/vae_spread.py trains only a build's VAE stages per seed and measures what each VAE gives back, beside
a built base's VAE measured the same way, so that the spread from seed to seed can be told from a setting's effect.
(That a seed's VAE is the build's VAE for the same settings and seed is checked in test_tinybase's small build.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import vae_spread as vs  # noqa: E402

BASE = ROOT / "sdlora" / "base_model"
TINY = ["--set", "n_images=40", "--set", "vae_colour_images=8", "--set", "vae_texture_images=8",
        "--set", "vae_steps=3", "--set", "decoder_steps=2"]


@pytest.mark.skipif(not (BASE / "build.json").is_file(), reason="tiny base model not built")
def test_seeds_are_measured_beside_the_built_in_base_and_joined_by_merge(tmp_path, capsys):
    report = tmp_path / "a.json"
    vs.main([*TINY, "--seeds", "0", "1", "--label", "toy", "--json", str(report)])
    out = capsys.readouterr().out
    written = json.loads(report.read_text())
    assert written["trained"] == ["toy, seed 0", "toy, seed 1"]
    base, seed0, seed1 = (written["columns"][c] for c in ("base base_model", "toy, seed 0", "toy, seed 1"))
    assert base.keys() == seed0.keys() == seed1.keys()
    # the built-in base's VAE is measured as its build measured it (build.json), and its hatch ceiling in lines
    # is the one bench/style_quality.py judges LoRAs against on it (9.3 of the styled 143)
    card = json.loads((BASE / "build.json").read_text())["figures"]["vae"]
    assert base["PSNR of the scenes (dB)"] == pytest.approx(card["psnr_db"], abs=0.3)
    assert base["lines 45 deg, 6 px: direction kept"] == pytest.approx(card["lines_kept"]["45"]["6"], abs=0.03)
    assert base["hatch 6 px: texture kept"] == pytest.approx(card["texture_kept"]["hatch"]["6"], abs=0.03)
    lines = next(k for k in base if k.startswith("hatch hatch_lines: ceiling"))
    assert "styled 142.797" in lines and base[lines] == pytest.approx(9.29, abs=0.05)
    # a few steps' VAE gives back far less than the built-in one, and the two seeds' VAEs differ
    assert seed0["PSNR of the scenes (dB)"] < base["PSNR of the scenes (dB)"] - 5
    assert seed0 != seed1
    span = abs(seed0["PSNR of the scenes (dB)"] - seed1["PSNR of the scenes (dB)"])
    assert f"| PSNR of the scenes (dB) | {base['PSNR of the scenes (dB)']:.3f} |" in out
    assert f"| {span:.3f} |" in out and "range over toy, seed 0, toy, seed 1" in out

    # a report is never overwritten; --merge joins reports into one table, and refuses a file that is not one
    with pytest.raises(SystemExit):
        vs.main([*TINY, "--seeds", "2", "--json", str(report)])
    assert "the file exists" in capsys.readouterr().err
    assert json.loads(report.read_text()) == written
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"columns": {"tints, seed 0": seed1}, "trained": ["tints, seed 0"]}))
    vs.main(["--merge", str(report), str(other)])
    merged = capsys.readouterr().out
    assert "| figure | base base_model | toy, seed 0 | toy, seed 1 | tints, seed 0 | range over" in merged
    bad = tmp_path / "c.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit, match=r"c\.json: not a report"):
        vs.main(["--merge", str(report), str(bad)])


def test_bad_settings_are_refused_before_any_training(capsys):
    for argv, message in ((["--set", "nope=1"], "'nope' is not a BuildConfig field"),
                          (["--set", "tint_p=pale"], "is not JSON"),
                          (["--set", "seed=3"], "give build seeds with --seeds"),
                          (["--seeds", "1", "1"], "each seed once")):
        with pytest.raises(SystemExit):
            vs.main([*argv, "--base", "none"])
        assert message in capsys.readouterr().err
