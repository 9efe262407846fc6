"""Data-parallel training under `accelerate launch --num_processes 2` (CPU, gloo) writes one LoRA."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sdlora import DataConfig, LoraSpec, TrainConfig, train



def test_two_processes_train_one_lora(tmp_path, style_dir):
    out = tmp_path / "out"
    accelerate = Path(sys.executable).with_name("accelerate")
    # On CPU, accelerate starts N processes through its torchrun path (--multi_gpu) and joins them
    # with gloo when ACCELERATE_USE_CPU is set; its --cpu flag alone starts one process.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdlora.cli", "train",
           "--data", str(style_dir), "--base", "tiny-random", "--steps", "3", "--rank", "4",
           "--output-dir", str(out), "--name", "mp", "--sample-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["mp"]                  # one run folder, not two
    run = out / "mp"
    assert [p.name for p in run.glob("*.safetensors")] == ["mp.safetensors"]
    assert json.loads((run / "config.json").read_text())["num_processes"] == 2
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(run / "mp.safetensors") and "None" not in lines   # one path, from the main process
    two = load_file(str(run / "mp.safetensors"))
    # the same run in one process sees half the examples per step, so its weights differ
    one = train(DataConfig(folder=str(style_dir)), LoraSpec(rank=4),
                TrainConfig(base="tiny-random", steps=3, sample_every=0, output_dir=str(tmp_path / "single"),
                            run_name="mp"))
    single = load_file(str(one.lora_path))
    assert two.keys() == single.keys()
    assert any(not torch.allclose(two[k].float(), single[k].float()) for k in two if "lora_up" in k)
