"""Every kind of base a user brings, end to end, through the CLI and the web UI's handlers.

For each base source: the built-in `tiny`, a diffusers folder, original-layout single files of SD 1.x,
SD 2.x v-prediction (no word on its variant: the 768 v model is assumed, with a warning) and SD 2.x-base
epsilon (an A1111 .yaml beside it says so). Each one: train a few steps, export, `sdlora check` (every
tool N/N), `inspect`, generate with the LoRA at 0 (pixel-equal to the base) and 1 (different), stop a
run and resume it (the same weights as the uninterrupted run), `merge` into a single file and load
that back as a base (its weights are the base's plus the LoRA's update), and the same training and
generation through the web UI. A hub id without network ends in one clear error.

The single files are tiny random-weight architectures with SD's real widths, converted to the original
layout; `single_file.CONFIG_ROOT` points at their bundled-style configs, so they load by the same code
as a user's full-size checkpoint (tests/test_ldm.py checks the full-size SD 1.5 key names and shapes).
"""
from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sdkit
from sdlora import DataConfig, LoraSpec, TrainConfig, train
from sdlora.bases import families
from sdlora.bases import single_file as ldm
from sdlora.bases.load import load_base
from sdlora.cli import main
from sdlora.loras.naming import naming_for
from sdlora.webui.forms import default_form
from sdlora.webui.state import WebUI

KINDS = ["tiny", "diffusers-folder", "sd1-file", "sd2-v-file", "sd2-base-file", "sdxl-file", "sdxl-folder"]
FAMILY = {"tiny": ("sd1", "epsilon"), "diffusers-folder": ("sd1", "epsilon"), "sd1-file": ("sd1", "epsilon"),
          "sd2-v-file": ("sd2", "v_prediction"), "sd2-base-file": ("sd2", "epsilon"),
          "sdxl-file": ("sdxl", "epsilon"), "sdxl-folder": ("sdxl", "epsilon")}
# A1111 maps U-Net keys by SD's block numbering (two layers per block); the built-in base has one layer per
# block, so A1111 could not place all its keys. But neither A1111 nor ComfyUI can load that base at all, so the
# check says the LoRA is for trying sdlora (and diffusers with that base) instead of raising a false alarm.
# The SDXL bases here are SDXL's architecture at a few channels (tiny_random_xl_base): its keys, not its sizes,
# so no tool but diffusers could load them either; tests/test_sdxl.py checks the full-size names.
SD_LAYOUT = {"tiny": False, "sdxl-file": False, "sdxl-folder": False}
STEPS = 3
TRAIN_ARGS = ["--trigger", "zqx", "--steps", str(STEPS), "--rank", "4", "--lr", "1e-2", "--sample-every", "0",
              "--seed", "5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The bases (built once) and the bundled-style configs the single files load with."""
    root = tmp_path_factory.mktemp("bases")
    configs = sdkit.config_root(root / "configs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ldm, "CONFIG_ROOT", configs)
        sd2_base = sdkit.single_file(root / "sd2-base.safetensors", "sd2-base", seed=3)
        (root / "sd2-base.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")  # A1111's, no 'v'
        bases = {"tiny": "tiny",
                 "diffusers-folder": str(sdkit.diffusers_folder(root / "folder", "sd1", seed=1)),
                 "sd1-file": str(sdkit.single_file(root / "sd1.safetensors", "sd1", seed=2)),
                 "sd2-v-file": str(sdkit.single_file(root / "sd2-v.safetensors", "sd2-v", seed=4)),
                 "sd2-base-file": str(sd2_base),
                 "sdxl-file": str(sdkit.single_file(root / "sdxl.safetensors", "sdxl", seed=6)),
                 "sdxl-folder": str(sdkit.diffusers_xl_folder(root / "xl-folder", seed=7))}
        yield bases


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # the sd2-v file's 'assuming ...' is tested in test_ldm
        code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_base_end_to_end(kind, world, tmp_path, style_dir, capsys):
    base = world[kind]
    out = tmp_path / "out"
    code, printed, err = run_cli(capsys, "train", "--data", style_dir, "--base", base, *TRAIN_ARGS,
                                 "--checkpoint-every", "1", "--output-dir", out, "--name", "run")
    assert code == 0, err
    lora = Path(printed.strip().splitlines()[-1])
    assert lora == out / "run" / "run.safetensors" and lora.is_file()
    modules = len({k.split(".")[0] for k in load_file(str(lora))})
    sd_layout = SD_LAYOUT.get(kind, True)
    tools = ("A1111", "ComfyUI", "diffusers") if sd_layout else ("ComfyUI", "diffusers")
    assert modules > 0 and all(f"{tool}: {modules}/{modules} mapped" in err for tool in tools), err  # export's check
    run_compat = json.loads((out / "run" / "compat.json").read_text())
    assert run_compat["ok"] and run_compat["sd_layout"] == sd_layout, run_compat

    # check and inspect, as a user would run them on the file
    code, printed, err = run_cli(capsys, "check", lora, "--base", base)
    assert code == 0, printed + err
    for tool in tools:
        assert f"{tool}: {modules}/{modules} mapped" in printed
    if sd_layout:
        assert "all keys map" in printed
    else:
        assert "A1111:" not in printed and "A1111:" not in err    # no key count for a base A1111 cannot load
        assert "diffusers maps every key. base '" in printed and "is not an SD checkpoint A1111 or ComfyUI can load" in printed
        assert "NOT every key maps" not in printed + err
    code, printed, _ = run_cli(capsys, "inspect", lora, "--json")
    info = json.loads(printed)
    family, prediction = FAMILY[kind]
    assert (info["modules"], info["unet_modules"], info["base"]) == (modules, modules, families.title(family))
    meta = info["metadata"]
    assert meta["ss_base_model_version"] == families.family(family).ss_base_model_version
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")

    # generate: strength 0 is the base, pixel for pixel; strength 1 changes the image
    images = {}
    for name, lora_arg in (("none", []), ("zero", ["--lora", f"{lora}:0"]), ("one", ["--lora", f"{lora}:1"])):
        code, _, err = run_cli(capsys, "generate", "--base", base, *lora_arg, "--prompt", "zqx, a red circle",
                               "--steps", "3", "--seed", "1", "--out", tmp_path / f"{name}.png")
        assert code == 0, err
        images[name] = pixels(tmp_path / f"{name}.png")
    assert np.array_equal(images["zero"], images["none"])
    assert not np.array_equal(images["one"], images["none"])

    # stop after step 1 and resume from the CLI: the same LoRA as the run that was never stopped
    cancel = threading.Event()
    data, spec, cfg = DataConfig(folder=str(style_dir), trigger="zqx"), LoraSpec(rank=4), TrainConfig(
        base=base, steps=STEPS, lr=1e-2, sample_every=0, seed=5, checkpoint_every=1, output_dir=str(out),
        run_name="stopped")
    stopped = train(data, spec, cfg, callbacks=sdkit.StopAt(1, cancel), cancel=cancel)
    assert stopped.cancelled and stopped.lora_path is None
    code, printed, err = run_cli(capsys, "train", "--resume", stopped.run_dir)
    assert code == 0, err
    resumed, whole = load_file(printed.strip().splitlines()[-1]), load_file(str(lora))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)

    # merge into a single file and load it back as a base: the base's weights plus the LoRA's update
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", "--base", base, "--lora", f"{lora}:1", "--out", merged)
    assert code == 0, err
    assert_merged_base(base, merged, lora, family, prediction)
    code, _, err = run_cli(capsys, "generate", "--base", merged, "--prompt", "zqx, a red circle", "--steps", "3",
                           "--seed", "1", "--out", tmp_path / "merged.png")
    assert code == 0, err
    assert pixels(tmp_path / "merged.png").shape == images["one"].shape

    # the web UI: the same training and generation through its handlers
    assert_web_ui_trains_and_generates(base, tmp_path, style_dir, sd_layout)


def assert_merged_base(base: str, merged: Path, lora: Path, family: str, prediction: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # the merged file says what it is: nothing assumed
        back = load_base(str(merged), fresh=True)
    assert (back.family, back.prediction_type) == (family, prediction)
    original = load_base(base, fresh=True)
    sd = load_file(str(lora))
    name = next(k for k in sd if k.endswith(".lora_down.weight") and "attn2_to_k" in k).split(".")[0]
    naming = naming_for(original)
    path = next(p for p, m in original.unet.named_modules()
                if isinstance(m, torch.nn.Linear) and naming.name("unet." + p) == name)
    up, down = sd[f"{name}.lora_up.weight"].float(), sd[f"{name}.lora_down.weight"].float()
    alpha = float(sd[f"{name}.alpha"])
    want = original.unet.get_submodule(path).weight.float() + alpha / down.shape[0] * up @ down
    got = back.unet.get_submodule(path).weight.float()
    assert torch.allclose(got, want, atol=2e-3, rtol=2e-3)             # merged files are fp16
    assert not torch.allclose(got, original.unet.get_submodule(path).weight.float(), atol=1e-6)


def assert_web_ui_trains_and_generates(base: str, tmp_path: Path, style_dir: Path, sd_layout: bool) -> None:
    ui = WebUI(tmp_path / "ui-outputs", base=base, datasets_dir=tmp_path / "none",
               upload_dir=tmp_path / "uploads")
    ui.load_uploads([str(p) for p in sorted(style_dir.glob("*"))], "zqx", default_form(base)["template"])
    form = default_form(base, len(ui.dataset.items))
    form.update(trigger="zqx", steps=2, sample_every=0)
    job = ui.start(form)
    deadline = time.time() + 300
    while job.alive() and time.time() < deadline:
        time.sleep(0.2)
    assert job.state == "done", job.error
    assert job.lora_path is not None and job.lora_path.is_file()
    gen = {"prompt": "zqx, a red circle", "negative_prompt": "", "seed": 1, "steps": 2, "guidance": 7.5,
           "width": None, "height": None}
    none, _ = ui.generate(base, [], gen)
    zero, _ = ui.generate(base, [(str(job.lora_path), 0.0, False, 1.0)], gen)
    one, info = ui.generate(base, [(str(job.lora_path), 1.0, False, 1.0)], gen)
    assert np.array_equal(np.asarray(zero), np.asarray(none)) and not np.array_equal(np.asarray(one), np.asarray(none))
    assert ui.base_loads == 1 and "at 1," in info
    compat = next(i["compat"] for i in ui.library() if i["file"] == str(job.lora_path))
    n = len({k.split(".")[0] for k in load_file(str(job.lora_path))})
    if sd_layout:
        assert compat == f"A1111 {n}/{n} · ComfyUI {n}/{n} · diffusers {n}/{n}"
    else:
        assert compat == f"diffusers {n}/{n} (trained on sdlora's own base: for trying sdlora)"


def test_a_hub_id_without_network_is_one_clear_error(tmp_path, style_dir, capsys):
    code, _, err = run_cli(capsys, "train", "--data", style_dir, "--base", "someone/some-model", "--resolution", "64",
                           *TRAIN_ARGS,
                           "--output-dir", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert "could not get base model 'someone/some-model' from the model hub" in err
    assert "pass a local diffusers folder or a .safetensors checkpoint file" in err
    code, _, err = run_cli(capsys, "generate", "--base", "someone/some-model", "--prompt", "x", "--out",
                           tmp_path / "x.png")
    assert code == 2 and "could not get base model" in err and not (tmp_path / "x.png").exists()
