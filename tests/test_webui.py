"""The web UI's handlers (sdlora.webui), called as plain functions: no browser, no server."""
from __future__ import annotations

import html
import importlib.util
import os
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from sdlora.webui import library_tab as webui_library
from sdlora.webui import images as webui_images
from sdlora.webui import state as webui
from sdlora.data.scan import load_image
from sdlora.webui.forms import default_form
from sdlora.webui.state import UserError, WebUI, safe_filename

REPO = Path(__file__).resolve().parents[1]
XSS = "<script>alert(1)</script>"


def _app():
    spec = importlib.util.spec_from_file_location("sdlora_app", REPO / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _png(path: Path, colour=(220, 40, 40), size=(80, 80), mode="RGB") -> Path:
    img = Image.new(mode, size, (10, 10, 20) if mode == "RGB" else (0, 0, 0, 0))
    ImageDraw.Draw(img).ellipse((10, 10, size[0] - 10, size[1] - 10), outline=colour, width=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _uploads(tmp_path: Path, n: int = 4) -> list[str]:
    colours = [(220, 40, 40), (40, 200, 60), (50, 90, 230), (240, 200, 20), (200, 40, 220)]
    return [str(_png(tmp_path / "in" / f"img {i}.png", colours[i % 5], (80 + i, 80))) for i in range(n)]


def form(**kw) -> dict:
    """The Train tab's fields as a fresh page shows them (the declared defaults), made quick for tests."""
    f = default_form("tiny-random")
    f.update({"trigger": "zqx", "steps": 4.0, "rank": 4.0, "lr": 1e-3, "resolution": 64.0, "sample_every": 0.0,
              **kw})
    return f


@pytest.fixture
def ui(tmp_path):
    return WebUI(tmp_path / "outputs", base="tiny-random", datasets_dir=tmp_path / "datasets",
                 upload_dir=tmp_path / "uploads")


def _lora(path: Path, title: str = "demo", trigger: str = "zqx", scale: float = 0.5) -> Path:
    """A kohya LoRA for the tiny-random base's cross-attention (random, so it visibly changes images)."""
    from sdlora.bases.load import tiny_random_base
    unet = tiny_random_base().unet
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, mod in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(2, mod.in_features, generator=g) * scale
            sd[f"{key}.lora_up.weight"] = torch.randn(mod.out_features, 2, generator=g) * scale
            sd[f"{key}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata={"modelspec.title": title, "modelspec.trigger_phrase": trigger,
                                       "modelspec.architecture": "stable-diffusion-v1/lora",
                                       "ss_steps": "10", "ss_num_train_images": "5"})
    return path


# ---- names, limits, dataset ----------------------------------------------------------------------

@pytest.mark.parametrize("raw, want", [
    ("../../etc/passwd", "passwd"), ("..\\..\\win.png", "win.png"), ("/abs/path/x.png", "x.png"),
    ("café ☕ 1.png", "café ☕ 1.png"), (".hidden.png", "hidden.png"), ("a\x00b\x1f.png", "ab.png"),
    ("<script>x</script>.png", "script.png"), ("<b>.png", "b.png"), ("..", "file"), ("", "file"),
    ("cafe\u0301.png", "café.png"),
])
def test_safe_filename_keeps_unicode_and_drops_paths(raw, want):
    assert safe_filename(raw) == want


def test_safe_filename_limits_length_in_bytes():
    name = safe_filename("ü" * 300 + ".png")
    assert name.endswith(".png") and len(name.encode()) <= 200


def test_upload_copies_into_outputs_with_safe_names(ui, tmp_path):
    evil = _png(tmp_path / "in" / "x" / "..png")           # a name that is only dots and a suffix
    paths = _uploads(tmp_path) + [str(evil)]
    ds = ui.load_uploads(paths, "zqx", webui.TEMPLATES["style"], 64)
    assert webui.within(ds.folder, ui.outputs / ".uploads")
    assert sorted(p.name for p in ds.folder.iterdir() if p.is_file()) == ["img 0.png", "img 1.png", "img 2.png",
                                                                         "img 3.png", "png"]
    assert len(ds.items) == 4 and all(it.caption == "an image in zqx style" for it in ds.items)


def test_upload_limits_give_clear_messages(ui, tmp_path, monkeypatch):
    paths = _uploads(tmp_path, 5)
    monkeypatch.setattr(webui_images, "MAX_FILES", 4)
    with pytest.raises(UserError, match="5 files uploaded; the limit is 4"):
        ui.load_uploads(paths, "zqx", "", 64)
    monkeypatch.setattr(webui_images, "MAX_FILES", 200)
    big = tmp_path / "in" / "big.png"
    big.write_bytes(Path(paths[0]).read_bytes() + b"\0" * 4000)
    monkeypatch.setattr(webui_images, "MAX_FILE_BYTES", 2000)
    ds = ui.load_uploads(paths + [str(big)], "zqx", "", 64)
    assert "big.png" not in {p.name for p in ds.folder.iterdir()}
    assert "over the 0 MB limit per file" in ds.summary() or "limit per file" in ds.summary()
    monkeypatch.setattr(webui_images, "MAX_FILE_BYTES", 10**9)
    monkeypatch.setattr(webui_images, "MAX_TOTAL_BYTES", 3 * Path(paths[0]).stat().st_size + 10)
    ds = ui.load_uploads(paths, "zqx", "", 64)
    assert len(ds.items) == 3 and "in total" in ds.summary()
    with pytest.raises(UserError, match="No files"):
        ui.load_uploads([], "zqx", "", 64)


def test_duplicate_names_are_renamed_not_overwritten(ui, tmp_path):
    a = _png(tmp_path / "a" / "Same.png", (200, 0, 0))
    b = _png(tmp_path / "b" / "same.png", (0, 200, 0))
    c = _png(tmp_path / "c" / "other.png", (0, 0, 200))
    ds = ui.load_uploads([str(a), str(b), str(c)], "zqx", "", 64)
    assert sorted(p.name for p in ds.folder.iterdir() if p.is_file()) == ["Same.png", "other.png", "same-2.png"]


def test_gallery_shows_each_image_as_trained_with_problems_beside_it(ui, tmp_path):
    paths = _uploads(tmp_path, 3)
    rgba = _png(tmp_path / "in" / "alpha.png", (255, 0, 200, 255), (80, 80), mode="RGBA")
    exif = Image.new("RGB", (120, 80), (10, 10, 20))
    ImageDraw.Draw(exif).rectangle((5, 30, 115, 50), fill=(0, 220, 220))
    tags = Image.Exif()
    tags[0x0112] = 6
    exif.save(tmp_path / "in" / "turned.jpg", exif=tags.tobytes(), quality=95)
    (tmp_path / "in" / "notes.png").write_bytes(b"plain text, not a picture")
    ds = ui.load_uploads(paths + [str(rgba), str(tmp_path / "in" / "turned.jpg"), str(tmp_path / "in" / "notes.png")],
                         "zqx", webui.TEMPLATES["style"], 64)
    rows = {r.name: r for r in ds.rows()}
    buckets = {it.path.name: f.bucket for it, f in zip(ds.items, ds.fits)}
    assert buckets["alpha.png"] == (64, 64) and buckets["turned.jpg"] == (48, 80)      # upright: a portrait
    for name in ("alpha.png", "turned.jpg"):
        shown = np.asarray(Image.open(rows[name].preview).convert("RGB"))
        want = np.asarray(load_image(ds.folder / name, 64, buckets[name]))
        assert np.array_equal(shown, want)                                            # exactly what trains
    assert np.asarray(Image.open(rows["alpha.png"].preview))[0, 0].tolist()[:3] == [255, 255, 255]  # alpha on white
    turned = np.asarray(Image.open(rows["turned.jpg"].preview).convert("RGB")).astype(int)
    assert turned[:, 24].sum() > turned[40, :].sum()         # the horizontal bar now stands upright
    assert "Buckets (each image trains at its own shape): 48x80: 1 image, 64x64: 4 images" in ds.summary()
    squared = ui.rescan("zqx", webui.TEMPLATES["style"], 64, buckets=False)
    assert {f.bucket for f in squared.fits} == {(64, 64)} and "cropped to a square: 64x64: 5 images" in squared.summary()
    bad = rows["notes.png"]
    assert not bad.usable and bad.preview is None and "not an image" in bad.notes[0]
    assert "5 images ready to train" in ds.summary() and "1 skipped" in ds.summary()


def test_caption_edit_is_saved_and_trigger_is_kept(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path), "zqx", webui.TEMPLATES["style"], 64)
    row = ui.set_caption("img 1.png", "zqx, a   green\nring")
    assert row.caption == "zqx, a green ring" and row.notes == []
    assert (ui.dataset.folder / "img 1.txt").read_text(encoding="utf-8") == "zqx, a green ring"
    row = ui.set_caption("img 0.png", " an image in  zqx style ")      # unchanged: no caption file is written
    assert row.caption == "an image in zqx style" and not (ui.dataset.folder / "img 0.txt").exists()
    row = ui.set_caption("img 2.png", "a blue ring")
    assert row.caption == "zqx, a blue ring" and "trigger added" in row.notes[0]
    with pytest.raises(UserError):
        ui.set_caption("../../escape.png", "x")


def test_adding_files_keeps_edited_captions(ui, tmp_path):
    paths = _uploads(tmp_path, 3)
    ui.load_uploads(paths, "zqx", webui.TEMPLATES["style"], 64)
    ui.set_caption("img 1.png", "zqx, edited before adding more")
    ds = ui.load_uploads(paths + _uploads(tmp_path / "more", 4)[3:], "zqx", webui.TEMPLATES["style"], 64)
    assert {it.path.name: it.caption for it in ds.items}["img 1.png"] == "zqx, edited before adding more"
    assert len(ds.items) == 4
    ui.clear_dataset()
    assert ui.dataset is None and ui.rescan("x", webui.TEMPLATES["style"], 64) is None


def test_rescan_follows_trigger_and_style(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path), "zqx", webui.TEMPLATES["style"], 64)
    assert ui.rescan("zqx", webui.TEMPLATES["style"], 64) is None                  # nothing changed: no re-render
    ds = ui.rescan("neonstyle", webui.TEMPLATES["subject"], 64)
    assert {it.caption for it in ds.items} == {"a photo of neonstyle"}
    with pytest.raises(UserError, match="trigger"):
        ui.rescan("two words", webui.TEMPLATES["style"], 64)


def test_defaults_follow_the_number_of_images():
    from sdlora.config import default_steps
    for n in (3, 5, 12, 25, 60):
        s = webui.suggest(n)
        assert s["steps"] == default_steps(n, 300) and 1 <= s["sample_every"] <= s["steps"]   # tiny: 300 per image
        assert webui.suggest(n, "tiny-random")["steps"] == default_steps(n) == 100 * min(max(n, 4), 20)
    assert webui.suggest(5)["rank"] <= webui.suggest(12)["rank"] <= webui.suggest(60)["rank"]
    assert webui.suggest(5)["lr"] == 3e-3 and webui.suggest(5, "tiny-random")["lr"] == 1e-4   # the base's own


def test_the_note_for_many_images_suggests_the_bases_steps(tmp_path):
    """More than 20 images: the note gives the steps a run would take on the server's base (training.plan.suggested),
    which counts 20 images at the base's steps per image: 100 for SD bases, 300 for `tiny`."""
    for base, steps in (("tiny-random", 2000), ("tiny", 6000)):
        ui = WebUI(tmp_path / base / "outputs", base=base, datasets_dir=tmp_path / base / "datasets",
                   upload_dir=tmp_path / base / "uploads")
        ds = ui.load_uploads(_uploads(tmp_path / base, 25), "zqx", webui.TEMPLATES["style"], 64)
        assert len(ds.items) == 25
        assert f"More than 20 images is fine; training takes longer ({steps} steps suggested)." in ds.summary()


def test_example_dataset_is_copied_with_its_trigger(ui, tmp_path):
    ex = tmp_path / "datasets" / "neon"
    for i in range(3):
        _png(ex / f"{i}.png", (0, 255, 60 * i))
        (ex / f"{i}.txt").write_text(f"neonstyle, shape {i}", encoding="utf-8")
    (ex / "README.md").write_text("# Neon\n\nTrigger word: `neonstyle`\n", encoding="utf-8")
    assert ui.examples() == ["neon"]
    ds, trigger = ui.load_example("neon", webui.TEMPLATES["style"], 64)
    assert trigger == "neonstyle" and len(ds.items) == 3 and ds.items[0].caption == "neonstyle, shape 0"
    ui.set_caption("0.png", "neonstyle, changed")
    assert (ex / "0.txt").read_text(encoding="utf-8") == "neonstyle, shape 0"          # the example is untouched
    with pytest.raises(UserError):
        ui.load_example("../outputs", "", 64)
    (ex / "sdlora.json").write_text('{"trigger": "fromjson"}')
    ds, trigger = ui.load_example("neon", webui.TEMPLATES["style"], 64)
    assert trigger == "fromjson" and not [p for p in ds.problems if p.fatal]     # sdlora.json is not copied


@pytest.mark.skipif(not (REPO / "datasets").is_dir() or not any((REPO / "datasets").iterdir()),
                    reason="no example datasets in datasets/ yet")
def test_repo_example_datasets_load_clean(tmp_path):
    ui = WebUI(tmp_path / "outputs", base="tiny-random", datasets_dir=REPO / "datasets")
    for name in ui.examples():
        ds, trigger = ui.load_example(name, webui.TEMPLATES["style"], 64)
        assert trigger and len(ds.items) >= 5 and not [p for p in ds.problems if p.fatal], (name, ds.problems)
        assert all(trigger in it.caption for it in ds.items)


# ---- training ------------------------------------------------------------------------------------

def test_start_refuses_bad_input_with_the_field_named(ui, tmp_path):
    with pytest.raises(UserError, match="Add images first"):
        ui.start(form())
    ui.load_uploads(_uploads(tmp_path, 2), "zqx", webui.TEMPLATES["style"], 64)
    with pytest.raises(UserError, match="at least 3 are needed"):
        ui.start(form())
    ui.load_uploads(_uploads(tmp_path, 3), "zqx", webui.TEMPLATES["style"], 64)
    with pytest.raises(UserError, match="rank"):
        ui.start(form(rank=0.0))
    with pytest.raises(UserError, match="steps"):
        ui.start(form(steps=2.5))
    with pytest.raises(UserError, match="lr"):
        ui.start(form(lr=-1.0))
    with pytest.raises(UserError, match="lr"):
        ui.start(form(lr=0.0))
    # an emptied learning-rate field means the base's recommendation
    assert webui.build_configs(form(lr=None), str(tmp_path), "tiny", str(tmp_path))[2].lr is None
    with pytest.raises(UserError, match=r"dropout='x' is not allowed: use a number"):
        ui.start(form(dropout="x"))
    with pytest.raises(UserError, match=r"unknown setting\(s\) from the page: rnak"):
        ui.start(form(rnak=4))
    assert ui.job is None


def _wait(cond, timeout=600):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_train_in_background_one_at_a_time_stop_and_resume(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path), "zqx", webui.TEMPLATES["style"], 64)
    job = ui.start(form(steps=6.0))
    assert job.thread.is_alive()                                   # the handler returned at once
    with pytest.raises(UserError, match="already running"):
        ui.start(form())
    _wait(lambda: job.step >= 1 or not job.alive())
    assert "Step" in ui.progress()["html"]
    assert "Stopping" in ui.stop()
    job.thread.join(300)
    assert job.state == "stopped", job.error
    stopped_at = job.step
    assert 1 <= stopped_at < 6 and "Resume" in ui.progress()["html"]
    [(label, run)] = ui.resumable_runs()
    assert f"stopped at step {stopped_at}" in label
    job = ui.resume(run)
    job.thread.join(600)
    assert job.state == "done", job.error
    view = ui.progress()
    assert [s for s, _ in view["losses"]] == list(range(1, 7))    # the plot continues where it stopped
    assert view["lora"].endswith("zqx.safetensors") and len(view["files"]) == 3
    assert "Done: 6 / 6" in view["html"] and ui.resumable_runs() == []
    assert "already" not in ui.stop()


def test_progress_view_reports_steps_samples_and_messages(tmp_path):
    from PIL import Image

    from sdlora.training.events import StepInfo
    job = webui.Job()
    revs = [job.rev]
    job.on_plan(type("Plan", (), {"steps": 10})())
    job.on_step(StepInfo(1, 10, 0.5, 1e-4, 9.0, 81.0))                 # the first step includes the warm-up
    assert "Step 1 / 10 · loss 0.5000 · learning rate 1.0e-04 · estimating time left" in job.status_html()
    for step in (2, 3, 4):
        job.on_step(StepInfo(step, 10, 0.25, 1e-4, 9.0 + 2 * (step - 1), 0.0))
    revs.append(job.rev)
    # three 2-second steps timed: 6 steps left at 2 s each, not the mean with the 9-second first step
    assert "Step 4 / 10 · loss 0.2500 · learning rate 1.0e-04 · 12 s left" in job.status_html()
    assert 'style="width:40.0%"' in job.status_html()
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    colours = {0: (200, 0, 0), 1: (0, 0, 200)}

    def sample(step, seed, i, shade=0):
        path = run / "samples" / f"step-{step:06d}-seed{seed}-{i}.png"
        Image.new("RGB", (64, 64), tuple(min(255, c + shade) for c in colours[i])).save(path)
        return path
    job.prompts = ["zqx, a red circle", "a red circle"]
    job.on_sample(0, [sample(0, s, i) for i in (0, 1) for s in (1, 2)])
    job.on_sample(3, [sample(3, s, i, 50) for i in (0, 1) for s in (1, 2)])
    assert [c.split(" · ")[0] for _, c in job.samples] == ["step 3", "before training: what the base draws"]
    assert "with trigger: “zqx, a red circle”" in job.samples[0][1] and "without trigger: “a red circle”" in \
        job.samples[0][1]
    grid = np.asarray(Image.open(job.samples[0][0]))
    # 64 px samples enlarged 3x (nearest neighbour): 3 columns (base, with, without) x 2 seeds, beside titles
    assert grid.shape == (22 + 2 * 192, 64 + 3 * 192, 3)
    cell = lambda r, c: grid[22 + r * 192 + 96, 64 + c * 192 + 96]          # noqa: E731
    assert list(cell(0, 0)) == [200, 0, 0] and list(cell(1, 0)) == [200, 0, 0]      # the base (step 0, prompt 0)
    assert list(cell(0, 1)) == [250, 50, 50] and list(cell(0, 2)) == [50, 50, 250]  # step 3, with / without
    assert job.run_dir == run
    job.on_message("resuming <run> at step 3")
    revs.append(job.rev)
    assert "resuming &lt;run&gt; at step 3" in job.status_html()
    assert revs == sorted(set(revs))                                          # every update is seen by the pages


def test_loss_chart_has_the_raw_points_and_a_smoothed_curve():
    from sdlora.webui.results import loss_rows, smoothed
    losses = [(1, 0.8), (2, 0.01), (3, 0.5), (4, float("nan")), (5, 0.02)]
    rows = loss_rows(losses)
    raw = [(s, v) for s, v, k in rows if k == "raw"]
    smooth = [v for _, v, k in rows if k == "smoothed"]
    assert raw == [(1, 0.8), (2, 0.01), (3, 0.5), (5, 0.02)]
    assert smooth[0] == pytest.approx(0.8) and smooth == pytest.approx(smoothed([0.8, 0.01, 0.5, 0.02]))
    assert max(smooth) - min(smooth) < max(v for _, v in raw) - min(v for _, v in raw)     # calmer than the raw


def test_a_failed_start_shows_its_reason_escaped(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path, 3), "zqx", webui.TEMPLATES["style"], 64)
    job = ui.start(form(base="/no/such/folder/" + XSS + ".safetensors"))
    job.thread.join(120)
    assert job.state == "failed"
    html = ui.progress()["html"]
    assert "Training failed" in html and "<script>" not in html and "&lt;script&gt;" in html


def test_resume_refuses_folders_outside_outputs(ui, tmp_path):
    for bad in ("", str(tmp_path), str(ui.outputs / ".." / "x")):
        with pytest.raises(UserError):
            ui.resume(bad)


# ---- generate ------------------------------------------------------------------------------------

GEN = dict(prompt="zqx, a red circle", negative_prompt="", seed=3.0, steps=3.0, guidance=5.0, width=64.0, height=64.0)


def test_generate_strengths_without_reloading_the_base(ui):
    lora = str(_lora(ui.outputs / "demo" / "demo.safetensors"))
    img0, info0 = ui.generate("tiny-random", [(lora, 0.0, False, 1.0)], GEN)
    img1, info1 = ui.generate("tiny-random", [(lora, 1.0, False, 1.0)], GEN)
    plain, _ = ui.generate("tiny-random", [], GEN)
    again0, _ = ui.generate("tiny-random", [(lora, 0.0, False, 1.0)], GEN)
    assert ui.base_loads == 1                                      # one base, four images
    assert "demo at 0" in info0 and "demo at 1" in info1
    a0, a1 = np.asarray(img0), np.asarray(img1)
    assert not np.array_equal(a0, a1)
    assert np.array_equal(a0, np.asarray(plain)) and np.array_equal(a0, np.asarray(again0))


def test_sweep_is_one_row_at_fixed_seed(ui):
    lora = str(_lora(ui.outputs / "demo" / "demo.safetensors"))
    row = ui.sweep("tiny-random", [(lora, 0.7, False, 1.0)], GEN)
    assert [c for _, c in row] == ["0", "0.25", "0.5", "0.75", "1"]
    plain, _ = ui.generate("tiny-random", [], GEN)
    full, _ = ui.generate("tiny-random", [(lora, 1.0, False, 1.0)], GEN)
    assert np.array_equal(np.asarray(row[0][0]), np.asarray(plain))
    assert np.array_equal(np.asarray(row[-1][0]), np.asarray(full))
    with pytest.raises(UserError, match="Pick a LoRA"):
        ui.sweep("tiny-random", [(None, 1.0, False, 1.0)], GEN)


def test_mixing_and_separate_text_encoder_strength(ui):
    a = str(_lora(ui.outputs / "a" / "a.safetensors"))
    b = str(_lora(ui.outputs / "b" / "b.safetensors", scale=0.3))
    one, _ = ui.generate("tiny-random", [(a, 1.0, False, 1.0)], GEN)
    two, info = ui.generate("tiny-random", [(a, 1.0, False, 1.0), (b, 1.0, True, 0.0), (None, 1.0, False, 1.0)], GEN)
    assert "a at 1, b at 1" in info and not np.array_equal(np.asarray(one), np.asarray(two))
    assert ui.base_loads == 1


def test_generate_refuses_files_outside_outputs_and_bad_values(ui, tmp_path):
    outside = str(_lora(tmp_path / "elsewhere" / "x.safetensors"))
    with pytest.raises(UserError, match="only LoRA files under outputs"):
        ui.generate("tiny-random", [(outside, 1.0, False, 1.0)], GEN)
    with pytest.raises(UserError, match="width"):
        ui.generate("tiny-random", [], dict(GEN, width=65.0))
    with pytest.raises(UserError, match="could not|does not exist|not a diffusers"):
        ui.generate(str(tmp_path / "missing-base"), [], GEN)


def test_uploaded_lora_is_checked_and_offered(ui, tmp_path):
    up = ui.upload_dir / "abc" / "mine.safetensors"
    _lora(up)
    path = ui.add_lora_upload(str(up))
    assert ("uploaded: mine.safetensors", path) in ui.lora_choices()
    img, _ = ui.generate("tiny-random", [(path, 1.0, False, 1.0)], GEN)
    assert img.size == (64, 64)
    pickle = ui.upload_dir / "evil.ckpt"
    pickle.write_bytes(b"not really")
    with pytest.raises(UserError, match="only .safetensors"):
        ui.add_lora_upload(str(pickle))
    broken = ui.upload_dir / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="broken.safetensors"):
        ui.add_lora_upload(str(broken))


def test_prompt_is_prefilled_with_the_trigger(ui):
    lora = str(_lora(ui.outputs / "demo" / "demo.safetensors", trigger="neonstyle"))
    assert ui.prompt_for(lora, "") == "an image in neonstyle style"
    assert ui.prompt_for(lora, "a red circle") == "neonstyle, a red circle"
    assert ui.prompt_for(lora, "a NeonStyle circle") == "a NeonStyle circle"
    assert ui.prompt_for(None, "as typed") == "as typed"


# ---- library -------------------------------------------------------------------------------------

def test_library_lists_every_lora_with_metadata_as_escaped_text_and_no_server_paths(ui):
    a = _lora(ui.outputs / "run" / "run.safetensors", title=XSS)
    Image.new("RGB", (8, 8)).save(ui.outputs / "run" / "run.preview.png")
    (ui.outputs / "run" / "compat.json").write_text(json.dumps({"tools": {
        "a1111": {"mapped": 8, "total": 8, "unmapped": [], "note": ""},
        "comfyui": {"mapped": 7, "total": 8, "unmapped": ["lora_unet_x"], "note": ""}}}))
    _lora(ui.outputs / "loose.safetensors")
    _lora(ui.outputs / "run" / "checkpoints" / "step-000001" / "adapter.safetensors")   # not a LoRA to list
    _lora(ui.outputs / ".uploads" / "hidden.safetensors")
    cards, choices, empty = ui.library_view()
    assert sorted(key for _, key in choices) == ["loose.safetensors", "run/run.safetensors"] and empty == ""
    assert XSS not in cards and html.escape(XSS) in cards                # the title, as text
    assert "A1111 8/8 · ComfyUI 7/8" in cards and "SD 1.x" in cards and "trigger <code>zqx</code>" in cards
    assert str(ui.outputs) not in cards and "data:image/png;base64," in cards   # the preview inlined, no path
    d = ui.details("run/run.safetensors")
    assert d["metadata"]["title"] == XSS and "ComfyUI: 7/8 mapped; not mapped: lora_unet_x" in d["compat"]
    assert d["metadata"]["file"] == "run/run.safetensors" and str(ui.outputs) not in json.dumps(d["metadata"])
    assert [Path(f).name for f in d["files"]] == ["run.safetensors", "run.preview.png"]
    assert ui.details(str(a))["lora"] == str(a)
    assert ui.details("run/checkpoints/step-000001/adapter.safetensors")["files"] == []
    assert "no compat.json" in ui.details("loose.safetensors")["compat"]


def test_library_has_stopped_runs_filters_sorts_and_an_empty_state(ui):
    assert ui.library_view()[2] == webui_library.EMPTY
    _lora(ui.outputs / "done" / "done.safetensors")
    (ui.outputs / "done" / "config.json").write_text(json.dumps({"train": {"base": "tiny-random"}}))
    stopped = ui.outputs / "half"
    (stopped / "checkpoints" / "step-000003").mkdir(parents=True)
    for f in ("state.pt", "adapter.safetensors"):
        (stopped / "checkpoints" / "step-000003" / f).write_bytes(b"")
    (stopped / "config.json").write_text(json.dumps({"train": {"base": "tiny-random"}, "data": {"trigger": "qq"},
                                                     "lora": {"rank": 4}, "steps": 8, "captions": {"a.png": "x"},
                                                     "started_at": "2026-11-30T10:00:00"}))
    os.utime(stopped, (1, 1))                                          # the oldest
    runs = ui.library_runs()
    assert [(r["key"], r["state"]) for r in runs] == [("done/done.safetensors", "finished"), ("half/", "stopped")]
    assert runs[1]["step"] == 3 and runs[1]["total"] == 8 and runs[1]["base"] == "SD 1.x"
    assert [r["key"] for r in ui.library_runs(order="Oldest first")] == ["half/", "done/done.safetensors"]
    assert ui.library_runs(family="SD 2.x") == []
    cards, choices, empty = ui.library_view(family="SD 2.x")
    assert choices == [] and "choose *All bases*" in empty
    cards, choices, _ = ui.library_view()
    assert ("half/ · stopped at step 3 of 8", "half/") in choices and "stopped at step 3 of 8" in cards
    d = ui.details("half/")
    assert d["stopped"] and "Stopped at step 3 of 8" in d["state"] and d["lora"] is None
    assert "run folder" in ui.delete("half/") and not stopped.exists() and (ui.outputs / "done").exists()


def test_library_compares_two_loras_on_one_prompt_and_seed(ui):
    a = _lora(ui.outputs / "a" / "a.safetensors", scale=0.5)
    b = _lora(ui.outputs / "b" / "b.safetensors", scale=0.9)
    for run in ("a", "b"):
        (ui.outputs / run / "config.json").write_text(json.dumps({"train": {"base": "tiny-random"}}))
    (ui.outputs / "c").mkdir()
    c = _lora(ui.outputs / "c" / "c.safetensors")
    (ui.outputs / "c" / "config.json").write_text(json.dumps({"train": {"base": "tiny"}}))
    images = ui.compare("a/a.safetensors", "b/b.safetensors", "zqx, a red circle", 3)
    assert [cap for _, cap in images] == ["a/a.safetensors at 1, seed 3", "b/b.safetensors at 1, seed 3"]
    pa, pb = (np.asarray(im) for im, _ in images)
    assert pa.shape == pb.shape and not np.array_equal(pa, pb)
    again = ui.compare("a/a.safetensors", "a/a.safetensors", "zqx, a red circle", 3)
    assert np.array_equal(np.asarray(again[0][0]), np.asarray(again[1][0])) and np.array_equal(pa, np.asarray(again[0][0]))
    with pytest.raises(UserError, match="compare LoRAs of one base"):
        ui.compare("a/a.safetensors", "c/c.safetensors", "x", 1)
    with pytest.raises(UserError, match="Pick two finished LoRAs"):
        ui.compare("a/a.safetensors", "", "x", 1)
    assert a.exists() and b.exists() and c.exists()


def test_unreadable_lora_does_not_break_the_library(ui):
    bad = ui.outputs / "bad" / "bad.safetensors"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    cards, choices, _ = ui.library_view()
    assert choices[0][1] == "bad/bad.safetensors" and "unreadable" in cards


def test_delete_removes_the_run_and_nothing_else(ui, tmp_path):
    lora = _lora(ui.outputs / "run" / "run.safetensors")
    (ui.outputs / "run" / "config.json").write_text("{}")
    loose = _lora(ui.outputs / "loose.safetensors")
    (ui.outputs / "loose.json").write_text("{}")
    outside = _lora(tmp_path / "keep" / "keep.safetensors")
    for bad in (str(outside), str(ui.outputs), "", str(ui.outputs / "run" / "config.json"), "..", "../keep/"):
        with pytest.raises(UserError):
            ui.delete(bad)
    assert "run folder" in ui.delete(str(lora)) and not (ui.outputs / "run").exists()
    ui.delete(str(loose))
    assert not loose.exists() and not (ui.outputs / "loose.json").exists() and outside.exists()
    assert ui.library() == []


def test_delete_refuses_the_run_being_trained(ui):
    lora = _lora(ui.outputs / "run" / "run.safetensors")
    job, release = webui.Job(ui.outputs / "run"), threading.Event()
    job.thread = threading.Thread(target=release.wait, args=(30,))
    job.thread.start()
    ui.job = job
    try:
        with pytest.raises(UserError, match="training right now"):
            ui.delete(str(lora))
        with pytest.raises(UserError, match="already running"):
            ui.start(form())                                        # dataset or not, one training at a time
    finally:
        release.set()
        job.thread.join()


# ---- escaping and the command line ----------------------------------------------------------------

def test_texts_shown_as_html_are_escaped(ui, tmp_path):
    row = webui.Row("x.png", None, "", [XSS], False)
    assert "<script>" not in webui.notes_html(row) and "Not used: &lt;script&gt;" in webui.notes_html(row)
    assert "<script>" not in webui.progress_html(50, XSS)
    ui.load_uploads(_uploads(tmp_path, 3), "zqx", "", 64)
    ui.dataset.upload_notes.append(XSS)
    assert "<script>" not in ui.dataset.summary()


def test_command_line_defaults_and_auth(monkeypatch):
    app = _app()
    a = app.parse_args([])
    assert (a.host, a.port, a.share, a.base, a.outputs, a.auth) == ("127.0.0.1", 7860, False, "tiny", "outputs", None)
    assert app.parse_auth("me:secret:with:colons") == ("me", "secret:with:colons")
    assert app.parse_auth(None) is None
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(SystemExit):
            app.parse_auth(bad)


def test_native_resolution_and_durations():
    from sdlora.bases.load import native_resolution
    assert native_resolution("tiny-random") == 64
    assert native_resolution("/no/such/base") == 512
    assert [webui.duration(s) for s in (5, 65, 3725)] == ["5 s", "1 min 05 s", "1 h 02 min"]


def test_every_caption_edited_at_once_is_saved_beside_its_image(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path, 4), "zqx", webui.TEMPLATES["style"], 64)
    ui.set_caption("img 1.png", "zqx, a green ring")
    summary = ui.edit_captions("ring", "circle outline", "zqx", "neon tubes")
    captions = {r.name: r.caption for r in ui.dataset.rows()}
    assert captions["img 1.png"] == "zqx, a green circle outline, neon tubes"
    assert captions["img 0.png"] == "an image in zqx style, neon tubes"          # the trigger was in it already
    assert (ui.dataset.folder / "img 0.txt").read_text(encoding="utf-8") == captions["img 0.png"]
    assert "Edited 4 captions." in summary
    assert ui.edit_captions("", "", "zqx", "neon tubes").endswith("Edited 0 captions.")   # nothing added twice
    with pytest.raises(UserError, match="Upload images first"):
        WebUI(tmp_path / "o2", base="tiny-random").edit_captions("a", "b", "", "")


def test_cards_say_when_an_image_has_no_caption_and_errors_name_files_not_server_folders(ui, tmp_path):
    ui.load_uploads(_uploads(tmp_path, 3), "zqx", webui.TEMPLATES["style"], 64)
    ui.set_caption("img 1.png", "zqx, a green ring")
    rows = {r.name: r for r in ui.dataset.rows()}
    assert rows["img 0.png"].notes[0].startswith("no caption file: it trains with the template caption")
    assert not any("no caption file" in n for n in rows["img 1.png"].notes)
    (tmp_path / "in" / "notes.png").write_bytes(b"plain text, not a picture")
    ui.load_uploads([str(tmp_path / "in" / "img 0.png"), str(tmp_path / "in" / "notes.png")], "zqx",
                    webui.TEMPLATES["style"], 64)
    with pytest.raises(UserError) as e:
        ui.start(form())
    text = str(e.value)
    assert text.startswith("Your images: only 1 usable image(s); at least 3 are needed") and "- notes.png: " in text
    assert ".uploads" not in text and str(ui.outputs) not in text


def test_number_fields_leave_the_range_check_to_the_setting_so_the_error_names_it(ui):
    from sdlora.webui.page import build
    demo = build(ui)
    numbers = [b for b in demo.blocks.values() if (b.elem_id or "").startswith("f-") and type(b).__name__ == "Number"]
    assert numbers and all(getattr(b, "minimum", None) is None for b in numbers)
    with pytest.raises(UserError, match=r"steps=-5 is not allowed: use a whole number from 1"):
        ui.dataset = None
        ui.load_uploads(_uploads(Path(ui.outputs).parent, 3), "zqx", webui.TEMPLATES["style"], 64)
        ui.start(form(steps=-5.0))


def test_generate_on_a_quantised_base_is_its_own_load(ui):
    pytest.importorskip("bitsandbytes")
    lora = str(_lora(ui.outputs / "demo" / "demo.safetensors"))
    full, _ = ui.generate("tiny-random", [(lora, 1.0, False, 1.0)], GEN)
    q, info = ui.generate("tiny-random", [(lora, 1.0, False, 1.0)], GEN, "nf4")
    assert ui.base_loads == 2 and "at nf4" in info and "demo at 1" in info
    a, b = np.asarray(full, dtype=np.float32), np.asarray(q, dtype=np.float32)
    assert 0 < np.abs(a - b).mean() < 40                         # the same picture, through 4-bit weights
    q0, _ = ui.generate("tiny-random", [(lora, 0.0, False, 1.0)], GEN, "nf4")
    plain, _ = ui.generate("tiny-random", [], GEN, "nf4")
    assert ui.base_loads == 2 and np.array_equal(np.asarray(q0), np.asarray(plain))


def test_base_picker_lists_the_models_folders_and_the_defaults_follow_the_pick(tmp_path):
    import sdkit
    models = tmp_path / "models"
    sd1 = sdkit.single_file(models / "Stable-diffusion" / "sd15-style.safetensors", "sd1")
    (models / "checkpoints").mkdir(parents=True)
    from safetensors.torch import save_file
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(8),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
              str(models / "checkpoints" / "xl.safetensors"))
    save_file({"conditioner.embedders.0.model.ln_final.weight": torch.zeros(8),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
              str(models / "checkpoints" / "refiner.safetensors"))
    ui = WebUI(tmp_path / "outputs", base="tiny-random", datasets_dir=tmp_path / "datasets", models_dirs=[models])
    choices = dict((v, label) for label, v in ui.base_choices())
    assert list(choices)[:2] == ["tiny", "tiny-random"]                 # built in, then the server's --base
    assert "SD 1.x" in choices[str(sd1)] and "MB" in choices[str(sd1)]
    assert "SDXL" in choices[str(models / "checkpoints" / "xl.safetensors")]
    assert "Cannot be used" not in ui.base_note(str(models / "checkpoints" / "xl.safetensors"))
    assert "Cannot be used" in ui.base_note(str(models / "checkpoints" / "refiner.safetensors"))
    assert ui.suggestions(10, "tiny-random")["resolution"] == 64
    assert ui.suggestions(10, str(sd1))["resolution"] == 512           # an SD 1.x file without configs: SD's size
    ui.pick_base(str(sd1))
    assert ui.base == str(sd1) and "sd15-style" in ui.base_note(ui.base)


def test_a_page_opened_during_training_shows_the_jobs_settings_read_only(ui, tmp_path, monkeypatch):
    from sdlora.webui import train_tab
    from sdlora.webui.forms import train_controls
    names = ["base"] + [s.name for s in train_controls() if s.name != "base"]      # the page's order
    release = threading.Event()
    real_step = webui.Job.on_step

    def slow_step(self, info):                        # hold the run at step 1 until the page has looked
        real_step(self, info)
        release.wait(60)
    monkeypatch.setattr(webui.Job, "on_step", slow_step)
    ui.load_uploads(_uploads(tmp_path, 3), "zqx", webui.TEMPLATES["style"], 64)
    job = ui.start(form(steps=7.0, rank=3.0, lr=2e-3, seed=11.0, word_dropout=0.1))
    try:
        _wait(lambda: job.step >= 1 or not job.alive())
        out = train_tab.on_tick(ui, [-2, ""], names)          # a freshly loaded page's first tick
        start, stop, resume, note, *fields = out[10:]
        assert start["visible"] is False and stop["visible"] is True and resume["interactive"] is False
        assert "settings below are that run's" in note
        shown = {n: f["value"] for n, f in zip(names, fields)}
        assert all(f["interactive"] is False for f in fields)
        assert (shown["steps"], shown["rank"], shown["lr"], shown["seed"], shown["word_dropout"]) == \
            (7, 3, 2e-3, 11, 0.1)
        assert shown["trigger"] == "zqx" and shown["base"] == "tiny-random"
        import gradio as gr
        again = train_tab.on_tick(ui, out[0], names)      # the run is held: nothing new is sent
        assert again == [gr.skip()] * len(again)
    finally:
        release.set()
        job.thread.join(300)
    done = train_tab.on_tick(ui, out[0], names)
    assert done[10]["visible"] is True and done[11]["visible"] is False
    assert all(f["interactive"] is True for f in done[14:])
