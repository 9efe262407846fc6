"""Reliability: bad settings are refused before any model loads; faults while training never leave damage.

Faults are injected at the library's own seams (the atomic writer's temp file, write and rename,
a training step, the VAE) on the tiny random base; kill -9 is a real signal to a real process.
Sample and preview images are stubbed to a flat image (their rendering is tested elsewhere) so
that every run here costs only its few training steps.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdlora import generate, runs, safefiles

from sdlora.bases import load as models
from sdlora.cli import main as cli
from sdlora.config import ConfigError, DataConfig, GenerateConfig, LoraSpec, TrainConfig, from_dict
from sdlora.runs import load_checkpoint, new_run_dir
from sdlora.training.hardware import out_of_memory_advice
from sdlora.training.loop import Callbacks, TrainingError, _Trainer, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def flat_renders(monkeypatch):
    """Samples and the preview become a flat image, still written by the library's own writer."""
    monkeypatch.setattr(generate, "render", lambda pipe, cfg, res: Image.new("RGB", (res, res), (cfg.seed % 256, 9, 9)))


def cfg(tmp_path, **kw) -> TrainConfig:
    kw = {"base": "tiny-random", "steps": 2, "lr": 1e-3, "output_dir": str(tmp_path / "out"), "run_name": "run", **kw}
    return TrainConfig(**kw)


def run_train(style_dir, tmp_path, callbacks=None, data=None, **kw):
    return train(data or DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path, **kw), callbacks=callbacks)


# ---- settings ----------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
# (class, the bad setting, the text that says what is allowed)
BAD_SETTINGS = [
    (LoraSpec, {"rank": 0}, "from 1"),
    (LoraSpec, {"rank": 2.5}, "whole number"),
    (LoraSpec, {"alpha": 0.0}, "> 0"),
    (LoraSpec, {"dropout": 1.0}, "<= 0.99"),
    (LoraSpec, {"extra_targets": ("attn3.to_q",)}, "one of attn2.to_q"),
    (TrainConfig, {"steps": -5}, "from 1"),
    (TrainConfig, {"steps": 0}, "from 1"),
    (TrainConfig, {"lr": NAN}, "finite"),
    (TrainConfig, {"lr": 0.0}, "> 0"),
    (TrainConfig, {"lr": 2.0}, "<= 1"),
    (TrainConfig, {"text_encoder_lr": -1e-4}, "> 0"),
    (TrainConfig, {"batch_size": 0}, "from 1"),
    (TrainConfig, {"grad_accum": 0}, "from 1"),
    (TrainConfig, {"warmup_steps": -1}, "from 0"),
    (TrainConfig, {"weight_decay": INF}, "finite"),
    (TrainConfig, {"noise_offset": -0.1}, ">= 0"),
    (TrainConfig, {"min_snr_gamma": 0.0}, "> 0"),
    (TrainConfig, {"prior_loss_weight": -1.0}, ">= 0"),
    (TrainConfig, {"seed": -1}, "from 0"),
    (TrainConfig, {"seed": True}, "whole number"),
    (TrainConfig, {"schedule": "linear"}, "one of constant, cosine"),
    (TrainConfig, {"mixed_precision": "fp8"}, "one of no, fp16, bf16"),
    (TrainConfig, {"save_format": "ckpt"}, "one of kohya, diffusers"),
    (TrainConfig, {"save_dtype": "int8"}, "one of fp16, bf16, fp32"),
    (TrainConfig, {"checkpoint_every": -1}, "from 0"),
    (TrainConfig, {"sample_every": -2}, "from 0"),
    (TrainConfig, {"run_name": "../elsewhere"}, "plain name"),
    (TrainConfig, {"base": ""}, "'tiny'"),
    (DataConfig, {"resolution": 100}, "multiple of 8"),
    (DataConfig, {"resolution": 0}, "from 8"),
    (DataConfig, {"trigger": "two words"}, "one word"),
    (DataConfig, {"template": "no trigger here"}, "{trigger}"),
    (DataConfig, {"num_class_images": 2, "class_prompt": ""}, "class prompt"),
    (GenerateConfig, {"width": 100}, "multiple of 8"),
    (GenerateConfig, {"steps": 0}, "from 1"),
    (GenerateConfig, {"guidance": NAN}, "finite"),
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything loads (or builds) a base model."""
    def refuse(name):
        raise AssertionError(f"a base model ({name!r}) was loaded before the settings were checked")
    monkeypatch.setattr(models, "_load", refuse)
    monkeypatch.setattr(models, "_cache", {})


@pytest.mark.parametrize("cls,bad,allowed", BAD_SETTINGS,
                         ids=[f"{c.__name__}-{'-'.join(b)}" for c, b, _ in BAD_SETTINGS])
def test_every_bad_setting_is_one_error_naming_field_value_and_what_is_allowed(cls, bad, allowed, no_model_load):
    field, value = list(bad.items())[-1]
    shown = value[0] if field == "extra_targets" else value
    with pytest.raises(ConfigError) as err:
        cls(**bad)
    text = str(err.value)
    assert f"{field}={shown!r}" in text, text
    assert allowed in text, text
    assert err.value.__cause__ is None and err.value.__context__ is None          # one error, not a chain
    with pytest.raises(ConfigError, match=f"{field}="):                           # settings read from JSON too
        from_dict(cls, bad)


def test_unknown_setting_names_are_refused_with_the_known_ones(no_model_load):
    with pytest.raises(ConfigError, match=r"stepz.*known: .*steps"):
        from_dict(TrainConfig, {"stepz": 3})


@pytest.mark.parametrize("args,needle", [
    (["--rank", "0"], "rank=0"), (["--steps", "-1"], "steps=-1"), (["--lr", "nan"], "lr=nan"),
    (["--resolution", "100"], "resolution=100"), (["--batch-size", "0"], "batch_size=0"),
    (["--dropout", "2"], "dropout=2.0"), (["--trigger", "a b"], "trigger='a b'"),
    (["--name", ".hidden"], "run_name='.hidden'"),
])
def test_command_line_refuses_bad_settings_before_loading_the_model(tmp_path, style_dir, capsys, no_model_load,
                                                                    args, needle):
    out = tmp_path / "out"
    code = cli(["train", "--data", str(style_dir), "--base", "tiny-random", "--output-dir", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not out.exists()                                                       # no run folder either


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 training is allowed where CUDA is")
def test_settings_checked_at_train_time_are_also_checked_before_the_model(tmp_path, style_dir, no_model_load):
    with pytest.raises(ConfigError, match="mixed_precision='fp16'.*'bf16' or 'no'"):
        run_train(style_dir, tmp_path, mixed_precision="fp16")
    with pytest.raises(TrainingError, match="no config.json"):
        train(None, resume=tmp_path)


def test_dataset_problems_are_reported_before_the_model_loads(tmp_path, style_dir, no_model_load):
    """train.py's own promise: 'plan checks the dataset ... before any model is loaded'."""
    with pytest.raises(ConfigError, match=r"does not exist"):
        run_train(style_dir, tmp_path, data=DataConfig(folder=str(tmp_path / "nope")))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"a\.png"):
        run_train(style_dir, tmp_path, data=DataConfig(folder=str(junk)))
    assert not (tmp_path / "out").exists()


# ---- faults while writing files ----------------------------------------------------------------------------

class Faults:
    """Make the library's atomic writes fail on one chosen file, the way real faults do.

    ``when(path)`` picks the write by the final path the library is writing (the first match
    fails, later ones go through); ``error(path)`` makes the exception. ``at`` is where it
    fails: "write" (half the bytes reach the temp file, then the error), "rename" (the temp
    file is whole, os.replace fails) or "create" (no temp file or folder can be made, as in a
    folder without write permission).
    """

    def __init__(self, monkeypatch, when, error, at: str = "write"):
        self.when, self.error, self.at, self.hits = when, error, at, []
        self._writing: Path | None = None
        real_mkstemp, real_write_all, real_replace, real_mkdir = (
            safefiles.tempfile.mkstemp, safefiles._write_all, os.replace, Path.mkdir)

        def mkstemp(*args, **kw):                 # safefiles: mkstemp(prefix=".NAME.", suffix=".tmp", dir=FOLDER)
            final = Path(kw["dir"]) / kw["prefix"][1:-1]
            if self.at == "create" and self.fire(final):
                raise self.error(Path(kw["dir"]) / (kw["prefix"] + "xxxxxxxx" + kw["suffix"]))
            self._writing = final
            return real_mkstemp(*args, **kw)

        def write_all(fh, data):
            if self.at == "write" and self.fire(self._writing):
                fh.write(bytes(data[: len(data) // 2]))
                fh.flush()
                raise self.error(self._writing)
            real_write_all(fh, data)

        def replace(src, dst, *args, **kw):
            if self.at == "rename" and self.fire(Path(dst)):
                raise self.error(Path(src))
            return real_replace(src, dst, *args, **kw)

        def mkdir(path, *args, **kw):
            if self.at == "create" and self.fire(Path(path)):
                raise self.error(Path(path))
            return real_mkdir(path, *args, **kw)

        monkeypatch.setattr(safefiles, "tempfile", SimpleNamespace(mkstemp=mkstemp))
        monkeypatch.setattr(safefiles, "_write_all", write_all)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(Path, "mkdir", mkdir)

    def fire(self, path: Path | None) -> bool:
        if self.hits or path is None or not self.when(path):
            return False
        self.hits.append(path)
        return True


def temp_leftovers(root: Path) -> list[str]:
    """The library's temp names start with '.' (.NAME.xxxx.tmp, .tmp-step-N-PID); a run has no other dot files."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


def assert_every_file_whole(run: Path) -> None:
    """Every file under its final name parses completely; every checkpoint folder loads."""
    for p in run.rglob("*"):
        if p.is_dir() or p.name.startswith(".") or p.parent.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text(encoding="utf-8"))
        elif p.suffix == ".safetensors":
            safefiles.read_lora_file(p)
        elif p.suffix == ".png":
            with Image.open(p) as im:
                im.load()
        elif p.name == "state.pt":
            torch.load(p, weights_only=True)
        else:
            assert p.name == "log.csv", f"a file kind this test does not know: {p}"
    for ck in (run / "checkpoints").glob("step-*") if (run / "checkpoints").is_dir() else ():
        load_checkpoint(ck)


def ck(n: int):
    """Matches a file inside checkpoint n's temp folder (the folder is renamed to step-N when whole)."""
    return lambda p: p.parent.name.startswith(f".tmp-step-{n:06d}-")


# Every kind of file a run writes: (name, which write fails, where it fails, the final path that must not appear)
FILE_KINDS = {
    "config": (lambda p: p.name == "config.json", "write", "config.json"),
    "checkpoint-adapter": (lambda p: ck(2)(p) and p.name == "adapter.safetensors", "write", "checkpoints/step-000002"),
    "checkpoint-state": (lambda p: ck(2)(p) and p.name == "state.pt", "rename", "checkpoints/step-000002"),
    "checkpoint-folder": (lambda p: p.name == "step-000002", "rename", "checkpoints/step-000002"),
    "lora-write": (lambda p: p.name == "run.safetensors", "write", "run.safetensors"),
    "lora-rename": (lambda p: p.name == "run.safetensors", "rename", "run.safetensors"),
    "sidecar": (lambda p: p.name == "run.json", "write", "run.json"),
    "preview": (lambda p: p.name == "run.preview.png", "rename", "run.preview.png"),
    "sample": (lambda p: p.parent.name == "samples", "write", "samples/step-000002-seed1-0.png"),
    "compat-report": (lambda p: p.name == "compat.json", "write", "compat.json"),
    "isolation-picture": (lambda p: p.parent.name == "isolation_images" and p.suffix == ".png", "write",
                          "isolation_images/0000-captioned.png"),
    "isolation-latents": (lambda p: p.name == "latents.safetensors", "write", "isolation_images/latents.safetensors"),
}


def file_kind(run: Path, p: Path) -> str:
    """The FILE_KINDS name of a file in a finished run ('log' for the append-only log.csv)."""
    rel = p.relative_to(run).as_posix()
    if rel == "log.csv":
        return "log"
    if rel.startswith("checkpoints/"):
        return {"adapter.safetensors": "checkpoint-adapter", "state.pt": "checkpoint-state"}.get(p.name, "?")
    if rel.startswith("samples/"):
        return "sample"
    if rel.startswith("isolation_images/"):
        return "isolation-latents" if p.name == "latents.safetensors" else "isolation-picture"
    return {"config.json": "config", f"{run.name}.safetensors": "lora-write", f"{run.name}.json": "sidecar",
            f"{run.name}.preview.png": "preview", "compat.json": "compat-report"}.get(rel, "?")


@pytest.mark.parametrize("kind", sorted(FILE_KINDS))
def test_failure_while_writing_any_file_leaves_no_partial_file_and_no_temp(tmp_path, style_dir, monkeypatch, kind):
    when, at, final = FILE_KINDS[kind]
    faults = Faults(monkeypatch, when, lambda path: OSError(errno.EIO, "injected I/O error"), at=at)
    with pytest.raises(OSError, match="injected I/O error"):
        run_train(style_dir, tmp_path, checkpoint_every=1, sample_every=2, sample_seeds=(1,))
    assert faults.hits, f"no {kind} file was written"
    run = tmp_path / "out" / "run"
    assert not (run / final).exists(), f"{final} exists after its write failed"
    assert temp_leftovers(tmp_path / "out") == []
    assert_every_file_whole(run)
    if kind.startswith("checkpoint"):
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000001"]


# ---- disk full, permission denied --------------------------------------------------------------------------

class Recorder(Callbacks):
    """Remembers each checkpoint's bytes when it is written."""

    def __init__(self, on_step=None):
        self.saved: dict[Path, str] = {}
        self.hook = on_step

    def on_checkpoint(self, step, path):
        for f in sorted(path.iterdir()):
            self.saved[f] = hashlib.sha256(f.read_bytes()).hexdigest()
        if self.hook:
            self.hook(step, path)

    def assert_intact(self):
        assert self.saved
        for f, digest in self.saved.items():
            assert hashlib.sha256(f.read_bytes()).hexdigest() == digest, f"{f} changed"
        for folder in {f.parent for f in self.saved}:
            load_checkpoint(folder)


@pytest.mark.parametrize("target", ["checkpoint", "lora"])
def test_disk_full_while_saving_is_a_clear_error_and_earlier_checkpoints_stay(tmp_path, style_dir, monkeypatch,
                                                                              target):
    when = ck(2) if target == "checkpoint" else (lambda p: p.name == "run.safetensors")
    # a write that hits a full disk fails as OSError(ENOSPC) without a file name, as write(2) does
    faults = Faults(monkeypatch, when, lambda path: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), at="write")
    rec = Recorder()
    with pytest.raises(OSError) as err:
        run_train(style_dir, tmp_path, checkpoint_every=1, callbacks=rec)
    run = tmp_path / "out" / "run"
    assert faults.hits
    text = str(err.value)
    assert "No space left on device" in text, text
    assert str(run) in text, f"the error does not say where it was writing: {text!r}"
    rec.assert_intact()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == (
        ["step-000001"] if target == "checkpoint" else ["step-000001", "step-000002"])
    assert temp_leftovers(tmp_path / "out") == []


def test_permission_denied_on_the_checkpoints_folder_is_clear_and_earlier_checkpoints_stay(tmp_path, style_dir,
                                                                                          monkeypatch):
    folder = tmp_path / "out" / "run" / "checkpoints"
    armed = threading.Event()
    if os.geteuid() == 0:       # root writes through chmod; simulate what the OS does for a read-only folder
        Faults(monkeypatch, lambda p: armed.is_set() and folder in p.parents,
               lambda path: PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path)), at="create")

        def lock(step, path):
            armed.set()
    else:
        def lock(step, path):
            os.chmod(folder, 0o500)
    rec = Recorder(on_step=lock)
    try:
        with pytest.raises(PermissionError) as err:
            run_train(style_dir, tmp_path, checkpoint_every=1, callbacks=rec)
    finally:
        os.chmod(folder, 0o700)
    text = str(err.value)
    assert "Permission denied" in text and str(folder) in text, text
    rec.assert_intact()
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    assert not (folder.parent / "run.safetensors").exists()


# ---- kill -9, then resume ----------------------------------------------------------------------------------

def test_kill_9_at_a_random_step_then_resume_equals_uninterrupted(tmp_path, style_dir, capsys):
    steps = 8
    rng = random.Random(20240611)
    kill_after = rng.randint(2, steps - 4)        # wait for this checkpoint ...
    fraction = rng.uniform(0.0, 0.9)               # ... then kill this far into the next step (or its checkpoint)
    args = ["train", "--data", str(style_dir), "--base", "tiny-random", "--steps", str(steps), "--rank", "4",
            "--lr", "1e-3", "--seed", "3", "--flip", "--checkpoint-every", "1", "--save-dtype", "fp32",
            "--name", "style"]
    killed = tmp_path / "killed"
    run = killed / "style"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sdlora.cli", *args, "--output-dir", str(killed)],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline, seen = time.monotonic() + 240, {}
            while kill_after not in seen:              # when checkpoints kill_after - 1 and kill_after appear
                for step in (kill_after - 1, kill_after):
                    if step not in seen and (run / "checkpoints" / f"step-{step:06d}").is_dir():
                        seen[step] = time.monotonic()
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint appeared within 240 s"
                time.sleep(0.002)
            # the delay is a share of one step's measured time, so the kill lands inside training on any machine
            time.sleep(fraction * (seen[kill_after] - seen.get(kill_after - 1, seen[kill_after])))
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL, "the training finished before it could be killed"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for folder in (run / "checkpoints").glob("step-*"):      # whatever the kill hit, final names are whole
        load_checkpoint(folder)

    assert cli(["train", "--resume", str(run)]) == 0
    out, err = capsys.readouterr()
    resumed_at = int(re.search(r"resuming .* at step (\d+) of", err).group(1))
    assert kill_after <= resumed_at < steps
    assert out.strip().splitlines()[-1] == str(run / "style.safetensors")

    assert cli([*args, "--output-dir", str(tmp_path / "full")]) == 0
    full = load_file(str(tmp_path / "full" / "style" / "style.safetensors"))
    resumed = load_file(str(run / "style.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.allclose(full[k], resumed[k], rtol=0, atol=1e-6), k


# ---- non-finite values, out of memory ----------------------------------------------------------------------

def test_non_finite_vae_latent_names_the_image(tmp_path, style_dir, tiny_base, monkeypatch):
    real, calls = tiny_base.vae.encode, []

    def encode(x, *args, **kw):
        out = real(x, *args, **kw)
        calls.append(x)
        if len(calls) == 3:                           # the third image in name order: "img 2.png"
            out.latent_dist.mean = torch.full_like(out.latent_dist.mean, INF)
        return out
    monkeypatch.setattr(tiny_base.vae, "encode", encode)
    with pytest.raises(TrainingError, match=r"non-finite latents for .*img 2\.png"):
        train(DataConfig(folder=str(style_dir)), LoraSpec(rank=2), cfg(tmp_path), base=tiny_base)
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def _cpu_out_of_memory():
    torch.empty(1 << 62, dtype=torch.uint8)         # the allocator refuses: a real CPU out-of-memory error


def _cuda_out_of_memory():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 6.00 GiB total capacity)")


def _python_out_of_memory():
    raise MemoryError()


OOM_ERRORS = {"cuda": _cuda_out_of_memory, "cpu-allocator": _cpu_out_of_memory, "python": _python_out_of_memory}


@pytest.mark.parametrize("source", sorted(OOM_ERRORS))
def test_out_of_memory_names_the_settings_that_lower_memory(tmp_path, style_dir, monkeypatch, source):
    real = _Trainer.one_step

    def one_step(self, step):
        if step == 1:
            OOM_ERRORS[source]()
        return real(self, step)
    monkeypatch.setattr(_Trainer, "one_step", one_step)
    rec = Recorder()
    with pytest.raises(TrainingError) as err:
        run_train(style_dir, tmp_path, batch_size=2, checkpoint_every=1, callbacks=rec)
    text = str(err.value)
    for needle in ("out of memory", "batch_size 2 -> 1", "gradient_checkpointing", "8-bit Adam", "cached",
                   str(tmp_path / "out" / "run")):
        assert needle in text, (needle, text)
    assert err.value.__cause__ is not None                   # the original error stays attached
    rec.assert_intact()


def test_out_of_memory_advice_follows_the_settings_in_use(tmp_path):
    advice = out_of_memory_advice(TrainConfig(), 768, tmp_path)
    assert "resolution 768 -> 512" in advice and "gradient_checkpointing on" in advice
    assert "resolution 512 -> 256" in out_of_memory_advice(TrainConfig(), 512, tmp_path)
    assert "batch_size" not in advice                                            # already 1
    assert "gradient_checkpointing" not in out_of_memory_advice(TrainConfig(gradient_checkpointing=True), 64, tmp_path)


# ---- two trainings with the same name ----------------------------------------------------------------------

def test_run_folders_created_at_the_same_moment_are_all_distinct(tmp_path):
    n, start, got = 16, threading.Barrier(16), []

    def make():
        start.wait()
        got.append(new_run_dir(tmp_path, "same"))
    threads = [threading.Thread(target=make) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == n and sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in got)


def test_two_trainings_with_the_same_name_started_at_once_never_overwrite_each_other(tmp_path, style_dir,
                                                                                     monkeypatch):
    start, real = threading.Barrier(2, timeout=120), runs.new_run_dir

    def at_once(output_dir, name):              # both trainings reach the folder creation together
        start.wait()
        return real(output_dir, name)
    monkeypatch.setattr(runs, "new_run_dir", at_once)
    results, errors = {}, []

    def one(seed):
        try:
            results[seed] = run_train(style_dir, tmp_path, seed=seed, checkpoint_every=1, sample_every=2,
                                      sample_seeds=(1,))
        except BaseException as e:  # noqa: BLE001 - a thread's error is reported below with its seed
            errors.append((seed, e))
    threads = [threading.Thread(target=one, args=(seed,)) for seed in (11, 22)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    folders = {seed: r.run_dir for seed, r in results.items()}
    assert sorted(p.name for p in folders.values()) == ["run", "run-2"]
    for seed, run in folders.items():
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == seed
        meta = safefiles.read_lora_file(results[seed].lora_path)[1]
        assert json.loads(meta["sdlora_settings"])["train"]["seed"] == seed
        assert len((run / "log.csv").read_text().splitlines()) == 2
        assert_every_file_whole(run)
        assert temp_leftovers(run) == []
    a, b = (load_file(str(results[s].lora_path)) for s in (11, 22))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # every kind of file a run writes is one whose failure test_failure_while_writing_any_file... covers
    first = folders[11]
    kinds = {file_kind(first, p) for p in first.rglob("*") if p.is_file()}
    assert "?" not in kinds, sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file()
                                    and file_kind(first, p) == "?")
