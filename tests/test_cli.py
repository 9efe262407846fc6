"""The command line: train -> generate -> inspect, one-line errors, exit codes."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sdlora.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_train_generate_inspect(tmp_path, style_dir, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(capsys, "train", "--data", str(style_dir), "--trigger", "zqx", "--base", "tiny-random",
                         "--steps", "3", "--rank", "4", "--alpha", "2", "--cross-attention", "qkvo",
                         "--output-dir", str(out_dir))
    assert code == 0, err
    lora = out.strip().splitlines()[-1]
    assert lora.endswith("zqx.safetensors")
    assert "3/3" in err and "img 0.png: zqx, a square outline" in err
    png = tmp_path / "a.png"
    code, out, err = run(capsys, "generate", "--base", "tiny-random", "--lora", f"{lora}:0.8", "--prompt",
                         "zqx, a circle", "--steps", "3", "--seed", "1", "--out", str(png))
    assert code == 0, err
    assert np.asarray(Image.open(png)).shape == (64, 64, 3)
    code, out, err = run(capsys, "inspect", lora, "--json")
    info = json.loads(out)
    assert code == 0 and info["format"] == "kohya" and info["modules"] == 28 and info["rank"] == 4
    assert info["alpha"] == 2.0 and info["trigger"] == "zqx" and info["steps"] == "3"


def test_bad_arguments_give_one_line_errors(tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", str(tmp_path / "nope"), "--base", "tiny-random")
    assert code == 2 and err.strip().count("\n") == 0 and "nope" in err and "does not exist" in err
    code, out, err = run(capsys, "train", "--data", str(tmp_path), "--rank", "0")
    assert code == 2 and "rank=0" in err
    code, out, err = run(capsys, "train", "--data", str(tmp_path), "--resolution", "100")
    assert code == 2 and "resolution=100" in err and "multiple of 8" in err
    code, out, err = run(capsys, "generate", "--base", "tiny-random", "--lora", str(tmp_path / "missing.safetensors"),
                         "--prompt", "x", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "missing.safetensors" in err and "Traceback" not in err
    code, out, err = run(capsys, "train", "--data", str(tmp_path), "--lr", "nan")
    assert code == 2 and "lr=nan" in err


def test_too_few_images_lists_every_problem(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.png").write_text("not an image")
    (d / "empty.jpg").write_bytes(b"")
    code, out, err = run(capsys, "train", "--data", str(d), "--base", "tiny-random")
    assert code == 2 and "notes.png" in err and "empty.jpg" in err


def test_dataset_folder_carries_its_trigger(tmp_path, style_dir, capsys):
    (style_dir / "sdlora.json").write_text('{"trigger": "glowzz"}', encoding="utf-8")
    code, out, err = run(capsys, "train", "--data", str(style_dir), "--base", "tiny-random", "--steps", "1",
                         "--output-dir", str(tmp_path / "o"))
    assert code == 0, err
    assert out.strip().endswith("glowzz.safetensors") and "glowzz, a square outline" in err
    (style_dir / "sdlora.json").write_text("{not json", encoding="utf-8")
    code, out, err = run(capsys, "train", "--data", str(style_dir), "--base", "tiny-random")
    assert code == 2 and "sdlora.json" in err and "not valid JSON" in err


def test_a_diffusers_layout_export_says_which_tools_read_it(tmp_path, style_dir, capsys):
    """--format diffusers: written, read back by inspect with every module, and the run says (on screen and in
    compat.json) that A1111, ComfyUI and kohya do not load that layout."""
    code, out, err = run(capsys, "train", "--data", str(style_dir), "--trigger", "zqx", "--base", "tiny-random",
                         "--steps", "1", "--rank", "4", "--format", "diffusers", "--sample-every", "0",
                         "--cross-attention", "qkvo", "--output-dir", str(tmp_path / "out"))
    assert code == 0, err
    lora = out.strip().splitlines()[-1]
    assert "note: diffusers layout: diffusers' load_lora_weights reads it; A1111 and kohya load none" in err
    compat = json.loads((tmp_path / "out" / "zqx" / "compat.json").read_text())
    assert "ComfyUI only its text-encoder modules (at twice the strength)" in compat["note"]
    code, out, _ = run(capsys, "inspect", lora, "--json")
    info = json.loads(out)
    assert (info["format"], info["modules"], info["rank"], info["alpha"]) == ("diffusers", 28, 4, 4.0)
