"""End to end in a real headless Chromium: upload, train, generate, sweep, download, library, refusals.

Starts `python app.py` on a free port with a temporary outputs folder and drives Debian's
chromium through Playwright's Python package (Playwright's own browser download is not used).
Screenshots go to test-artifacts/. Needs /usr/bin/chromium (scripts/install_browser.sh); without
it the test is skipped, except under CI, where it fails.
"""
from __future__ import annotations

import http.client
import io
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("SDLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_TITLE = "<script>window.__xss=1</script><img src=x onerror=window.__xss=2>"
STEPS = 200          # long enough to reload the page while it runs (about 15 s on the built-in base)
PHONE = {"width": 390, "height": 844}

pytestmark = pytest.mark.slow


def _need_browser():
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM} is missing")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright Python package is not installed")
    if missing:
        reason = " and ".join(missing) + "; run scripts/install_browser.sh"
        if os.environ.get("CI"):
            pytest.fail("browser test must run in CI: " + reason)
        pytest.skip(reason)


def _images(folder: Path) -> list[Path]:
    """Six usable images in different shapes of input, plus one broken file the scan must flag."""
    folder.mkdir(parents=True)
    paths = []
    for i, colour in enumerate([(230, 40, 40), (40, 200, 60), (50, 90, 230), (240, 200, 20)]):
        img = Image.new("RGB", (96, 96), (15, 15, 25))
        ImageDraw.Draw(img).ellipse((14 + i, 18, 80, 78 - i), outline=colour, width=5)
        name = ["café ☕ 0.png", "img 1.png", "img 2.png", "img 3.png"][i]
        img.save(folder / name)
        paths.append(folder / name)
    (folder / "img 1.txt").write_text("a green ring", encoding="utf-8")
    paths.append(folder / "img 1.txt")
    rgba = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((20, 20, 76, 76), outline=(255, 0, 200, 255), width=5)
    rgba.save(folder / "transparent.png")
    exif = Image.new("RGB", (128, 96), (15, 15, 25))
    ImageDraw.Draw(exif).rectangle((10, 30, 118, 66), outline=(0, 220, 220), width=5)
    tags = Image.Exif()
    tags[0x0112] = 6                                   # EXIF orientation: rotate 90 degrees
    exif.save(folder / "rotated.jpg", exif=tags.tobytes(), quality=95)
    (folder / "broken.png").write_bytes(b"this is not a picture")
    return paths + [folder / "transparent.png", folder / "rotated.jpg", folder / "broken.png"]


def _xss_lora(outputs: Path) -> Path:
    """A valid kohya LoRA whose title is a script: the library must show it as text."""
    import torch
    from safetensors.torch import save_file
    run = outputs / "xss"
    run.mkdir(parents=True)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": torch.zeros(32, 2),
               f"{key}.alpha": torch.tensor(2.0)}, str(run / "xss.safetensors"),
              metadata={"modelspec.title": XSS_TITLE, "ss_output_name": XSS_TITLE, "ss_trigger": "<b>bold</b>"})
    return run / "xss.safetensors"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(folder: Path, *args: str, env: dict | None = None):
    """Start app.py in `folder` on a free port -> (process, url, port, log); fails with the log if it does not start."""
    port = _free_port()
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    if env is None or "SDLORA_AUTH" not in env:
        full_env.pop("SDLORA_AUTH", None)
    log = open(folder / "app.log", "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--port", str(port), *args], cwd=folder,
                            stdout=log, stderr=subprocess.STDOUT, env=full_env)
    t0 = time.time()
    while time.time() - t0 < 180 and proc.poll() is None:
        log.seek(0)
        m = re.search(r"sdlora web UI: (http://\S+)", log.read())
        if m:
            return proc, m.group(1).rstrip("/"), port, log
        time.sleep(0.5)
    _stop(proc, log)
    log.seek(0)
    pytest.fail(f"app did not start:\n{log.read()[-3000:]}")


def _stop(proc, log) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    import sdkit
    tmp_path = tmp_path_factory.mktemp("app")
    outputs = tmp_path / "outputs"
    _xss_lora(outputs)
    models = tmp_path / "models"
    sdkit.single_file(models / "Stable-diffusion" / "my-sd15-style.safetensors", "sd1")
    base = "tiny" if (REPO / "sdlora" / "base_model" / "model_index.json").is_file() else "tiny-random"
    proc, url, port, log = _start_app(tmp_path, "--base", base, "--outputs", str(outputs), "--models-dir",
                                      str(models))
    try:
        yield {"url": url, "port": port, "outputs": outputs, "tmp": tmp_path, "base": base, "log": log}
    finally:
        _stop(proc, log)


def _status(port: int, path: str) -> int:
    """GET a raw path (no client-side normalisation of '..') and return the status code."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_http_serves_outputs_only(app_server):
    """Files outside outputs/ are refused over HTTP: absolute paths, '../', encoded '..' and the app's own files."""
    srv = app_server
    port, outputs, tmp = srv["port"], srv["outputs"], srv["tmp"]
    secret = tmp / "secret.txt"
    secret.write_text("not for the browser")
    ok = outputs / "xss" / "xss.safetensors"
    assert _status(port, f"/gradio_api/file={ok}") == 200                     # inside outputs/: served
    for path in [f"/gradio_api/file={secret}", "/gradio_api/file=/etc/passwd",
                 f"/gradio_api/file={outputs}/../secret.txt",
                 f"/gradio_api/file={quote(str(outputs))}%2F..%2Fsecret.txt",
                 "/gradio_api/file=../../../../../../etc/passwd", "/gradio_api/file=app.log",
                 f"/gradio_api/file={REPO / 'app.py'}", "/file=/etc/passwd", "/gradio_api/file=%2Fetc%2Fpasswd"]:
        assert _status(port, path) in (403, 404), path


def test_auth_from_env_and_warning_off_localhost(tmp_path):
    """SDLORA_AUTH requires a login; a host other than 127.0.0.1 prints a warning."""
    proc, url, port, log = _start_app(tmp_path, "--base", "tiny-random", "--outputs", str(tmp_path / "out"),
                                      "--host", "127.0.0.2", env={"SDLORA_AUTH": "me:s3cret"})
    try:
        log.seek(0)
        text = log.read()
        assert "WARNING: the UI is reachable through 127.0.0.2" in text and "Add --auth" not in text
        conn = http.client.HTTPConnection("127.0.0.2", port, timeout=30)
        conn.request("GET", "/config")
        assert conn.getresponse().status in (401, 403)
        conn.close()
        for password, want in (("wrong", 400), ("s3cret", 200)):
            conn = http.client.HTTPConnection("127.0.0.2", port, timeout=30)
            conn.request("POST", "/login", body=f"username=me&password={password}",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert conn.getresponse().status == want, password
            conn.close()
    finally:
        _stop(proc, log)
    uploads = re.search(r"uploads and generated images go to (\S+) ", text).group(1)
    assert not Path(uploads).exists()                               # the temporary folder goes with the app


def _text(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def _image_pixels(page, selector: str) -> np.ndarray:
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.browser
def test_browser_train_generate_library(app_server, tmp_path):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright
    srv, t_start = app_server, time.time()
    upload = _images(tmp_path / "upload")
    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.set_default_timeout(60_000)
        page.goto(srv["url"])
        expect(page.locator("#progress")).to_contain_text("Not started")    # the page has loaded its state
        trigger = page.locator("#f-trigger").get_by_role("textbox")
        trigger.fill("zqx")
        trigger.press("Tab")
        page.locator("#upload input[type=file]").set_input_files([str(p) for p in upload])
        expect(page.locator("#ds-summary")).to_contain_text("6 images ready to train", timeout=120_000)
        expect(page.locator("#ds-summary")).to_contain_text("1 skipped")
        expect(page.get_by_text("Not used:")).to_be_visible()            # broken.png's reason, next to its card
        expect(page.get_by_text("café ☕ 0.png: caption it trains with")).to_be_visible()
        first = page.locator(".sdl-caption textarea").first
        expect(first).to_have_value(re.compile("zqx"))
        first.fill("zqx, a red ring edited")
        first.press("Tab")
        caption = next(srv["outputs"].glob(".uploads/dataset-*/café ☕ 0.txt"), None)
        for _ in range(60):
            caption = next(srv["outputs"].glob(".uploads/dataset-*/café ☕ 0.txt"), None)
            if caption is not None:
                break
            time.sleep(0.5)
        assert caption is not None and caption.read_text(encoding="utf-8") == "zqx, a red ring edited"
        _shot(page, "1-train-dataset")

        picker = page.locator("#f-base")                                # the base picker lists the models folder
        picker.locator("input").click()
        expect(page.get_by_role("option", name=re.compile(r"my-sd15-style\.safetensors · SD 1\.x · "))).to_be_visible()
        page.keyboard.press("Escape")
        expect(page.locator("#base-note")).to_contain_text("tiny")

        page.locator("#f-steps input").fill(str(STEPS))
        page.locator("#f-lr input").fill("0.002")
        page.get_by_text("Advanced settings").click()
        page.locator("#f-sample_every input").fill(str(STEPS // 2))
        page.locator("#f-seed input").fill("17")
        t0 = time.time()
        page.locator("#start").click()
        expect(page.locator("#train-msg")).to_contain_text("Training started")
        expect(page.locator("#stop")).to_be_visible()                       # Start becomes Stop while it runs
        expect(page.locator("#start")).to_be_hidden()
        expect(page.locator("#progress")).to_contain_text("Step", timeout=120_000)

        reloaded = browser.new_page(viewport={"width": 1280, "height": 900})  # a reload while it trains
        reloaded.goto(srv["url"])
        expect(reloaded.locator("#job-note")).to_contain_text("that run's (read-only)", timeout=30_000)
        expect(reloaded.locator("#f-steps input")).to_have_value(str(STEPS))    # the job's settings, not defaults
        expect(reloaded.locator("#f-steps input")).to_be_disabled()
        reloaded.get_by_text("Advanced settings").click()
        expect(reloaded.locator("#f-seed input")).to_have_value("17")
        expect(reloaded.locator("#f-trigger textarea, #f-trigger input").first).to_have_value("zqx")
        expect(reloaded.locator("#stop")).to_be_visible()
        expect(reloaded.locator("#start")).to_be_hidden()
        expect(reloaded.locator("#progress")).to_contain_text(re.compile(r"estimating time left|\d+ (s|min).* left"))
        _shot(reloaded, "2a-train-reloaded-while-running")
        reloaded.close()
        seen = set()
        while "Done" not in (text := _text(page, "#progress")):
            assert "failed" not in text, text
            seen.add(text.split("·")[0].strip())
            assert time.time() - t0 < 420, f"training did not finish: {text}"
            time.sleep(0.3)
        timings["train"] = time.time() - t0
        assert any(s.startswith("Step") for s in seen) or "Starting" in " ".join(seen), seen
        assert f"{STEPS} / {STEPS}" in text
        expect(page.locator("#samples img").first).to_be_visible()
        expect(page.locator("#sample-caption")).to_contain_text(f"step {STEPS} · with trigger: “zqx")
        expect(page.locator("#sample-history img")).to_have_count(3)       # steps 0, 100 and 200
        expect(page.locator("#result a[href$='/zqx.safetensors']")).to_have_count(1)
        removes = page.locator("#result button[aria-label='Remove this file']")
        assert removes.count() == 3 and not any(removes.nth(i).is_visible() for i in range(3))   # read-only list
        expect(page.locator("#start")).to_be_visible()                      # the form is the user's again
        expect(page.locator("#f-steps input")).to_be_enabled()
        plot = np.asarray(Image.open(io.BytesIO(page.locator("#loss-plot").screenshot())).convert("RGB")).astype(int)
        smoothed_line = (np.abs(plot - np.array([67, 56, 202])).sum(axis=-1) < 60).sum()
        assert smoothed_line > 200, smoothed_line                           # the smoothed curve is drawn
        grid = _image_pixels(page, "#samples")                              # base | with | without, per seed
        assert grid.shape[1] >= 3 * 192 and grid.shape[0] >= 2 * 192, grid.shape
        _shot(page, "2-train-done")

        again = browser.new_page(viewport={"width": 1280, "height": 900})   # a reopened tab sees the run
        again.goto(srv["url"])
        expect(again.locator("#progress")).to_contain_text("Done", timeout=30_000)
        href = again.locator("#result a[href$='/zqx.safetensors']").first.get_attribute("href")
        body = again.request.get(href).body()
        from safetensors.torch import load as load_safetensors
        keys = list(load_safetensors(body))
        assert keys and all(k.startswith("lora_unet_") for k in keys)
        again.close()

        page.locator("#open-gen").click()
        expect(page.locator("#prompt textarea, #prompt input").first).to_have_value(re.compile("zqx"))
        page.locator("#g-steps input").fill("4")
        t0 = time.time()
        pixels = {}
        for strength in ("0", "1"):
            box = page.locator("#strength1 input[type=number]")
            box.fill(strength)
            box.press("Enter")
            page.locator("#generate-btn").click()
            expect(page.locator("#gen-info")).to_contain_text(f"at {strength},", timeout=180_000)
            pixels[strength] = _image_pixels(page, "#gen-image")
        timings["generate x2"] = time.time() - t0
        assert pixels["0"].shape == pixels["1"].shape
        assert np.abs(pixels["0"].astype(int) - pixels["1"].astype(int)).max() > 0, "strength 0 and 1 look identical"
        t0 = time.time()
        page.locator("#sweep-btn").click()
        expect(page.locator("#sweep img")).to_have_count(5, timeout=240_000)
        timings["sweep"] = time.time() - t0
        _shot(page, "3-generate")

        page.get_by_role("tab", name="Library").click()
        cards = page.locator("#lib-cards")
        expect(cards).to_contain_text("zqx")
        expect(cards).to_contain_text("<script>window.__xss=1</script>")      # shown as text, not run
        expect(cards).not_to_contain_text(str(srv["outputs"]))               # no server paths
        assert page.evaluate("window.__xss") is None and not dialogs
        _shot(page, "4-library")
        pick = page.locator("#lib-pick input")
        pick.click()
        page.get_by_role("option", name="xss/xss.safetensors · finished").click()
        expect(page.locator("#lib-files a[href$='/xss.safetensors']")).to_have_count(1)
        page.locator("#lib-delete").click()
        confirm = page.locator("#lib-confirm")
        box, delete_box = confirm.bounding_box(), page.locator("#lib-delete").bounding_box()
        assert 0 <= box["y"] - delete_box["y"] < 200, (box, delete_box)         # right under the button
        confirm.click()
        expect(cards).not_to_contain_text("xss/xss.safetensors", timeout=30_000)
        assert not (srv["outputs"] / "xss" / "xss.safetensors").exists()
        assert page.evaluate("window.__xss") is None and not dialogs

        phone = browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
        phone.goto(srv["url"])
        expect(phone.locator("#progress")).to_contain_text("Done", timeout=30_000)
        actions = phone.locator("#train-actions").bounding_box()           # Start is in reach without scrolling
        assert actions["y"] + actions["height"] <= PHONE["height"] + 1, actions
        _shot(phone, "5-phone-train")
        phone.get_by_role("tab", name="Library").click()
        card = phone.locator(".sdl-lib-card").first
        expect(card).to_contain_text("zqx")
        width = card.bounding_box()["width"]
        assert width >= 0.8 * (PHONE["width"] - 40), width                  # a card spans the screen, no 1-char column
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"] + 1   # nothing sideways
        _shot(phone, "6-phone-library")
        phone.close()
        browser.close()
    written = {p.name for p in srv["tmp"].iterdir()}                 # the app's working folder: only outputs/ grew
    assert written <= {"outputs", "app.log", "secret.txt", "models"}, written
    timings["total"] = time.time() - t_start
    print("e2e timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
