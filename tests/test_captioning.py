"""Automatic captions (sdlora.data.captioning) through the library, the CLI and the web UI, with a real model.

The model is a tiny random-weight ViT + GPT-2 VisionEncoderDecoder (the ViT-GPT2 captioner's architecture,
which ships no processor class) with a GPT-2 tokenizer made here from a vocab of single bytes and a few words;
it is saved with save_pretrained and loaded back from that folder the way any local model is. Nothing is
downloaded (conftest sets HF_HUB_OFFLINE=1).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_style_images
from sdlora.cli import main
from sdlora.data.captioning import CaptionError, Captioner, caption_folder, load_captioner
from sdlora.webui.state import UserError, WebUI

WORDS = ["red", "blue", "circle", "square", "on", "black", "background", "outline", "painting", "of", "the"]
OFFLINE_ID = "sdlora-tests/no-such-captioner"     # a hub id no cache holds


def _byte_chars() -> list[str]:
    """GPT-2's byte-to-character table: the printable characters each of the 256 bytes is written as."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_captioner(folder: Path) -> Path:
    """Save a tiny ViT-GPT2 captioner (model, tokenizer, image processor) to `folder`; returns it."""
    from transformers import (GPT2Config, GPT2Tokenizer, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
                              ViTConfig, ViTImageProcessor)
    folder.mkdir(parents=True)
    vocab = {"<|endoftext|>": 0}
    for ch in _byte_chars():
        vocab.setdefault(ch, len(vocab))
    words_from = len(vocab)
    for w in WORDS:
        vocab["\u0120" + w] = len(vocab)          # \u0120 is GPT-2's leading-space mark
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    torch.manual_seed(0)
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    dec = GPT2Config(vocab_size=len(vocab), n_positions=256, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                     eos_token_id=0)
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id = cfg.pad_token_id = cfg.eos_token_id = 0
    model = VisionEncoderDecoderModel(cfg)
    with torch.no_grad():
        # Random weights end at once (eos) or spell stray bytes; zero logits for those, so the greedy choice is
        # always a word and a caption runs to its token budget: what max_length cuts is then visible.
        model.decoder.transformer.wte.weight[:words_from] = 0
    model.save_pretrained(folder)
    GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_blip(folder: Path) -> Path:
    """Save a tiny BLIP captioner with its BlipProcessor (image processor + BERT tokenizer) to `folder`."""
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = BlipConfig(text_config=dict(vocab_size=len(vocab), encoder_hidden_size=32, max_position_embeddings=64,
                                      pad_token_id=0, sep_token_id=3, eos_token_id=3, bos_token_id=5, **small),
                     vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_captioner(tmp_path_factory.mktemp("captioner") / "vit-gpt2-tiny")


@pytest.fixture(scope="module")
def captioner(model_dir):
    return load_captioner(str(model_dir))


def dataset(folder: Path) -> Path:
    """4 images, one with a hand-written caption (BOM, two lines), and files that are not training images."""
    make_style_images(folder, n=4, captions=False)
    (folder / "img 1.txt").write_bytes("\ufeffmy own caption,\n  k\u00e9pt as is ".encode("utf-8"))
    (folder / "notes.md").write_text("about this set", encoding="utf-8")
    (folder / "sdlora.json").write_text('{"trigger": "zqx"}', encoding="utf-8")
    (folder / "fake.png").write_text("not an image", encoding="utf-8")
    (folder / ".hidden.png").write_bytes((folder / "img 0.png").read_bytes())
    return folder


def txt_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.suffix == ".txt"}


def words_after(caption: str, prefix: str) -> list[str]:
    assert caption.startswith(prefix + ", "), caption
    return caption[len(prefix) + 2:].split()


# ---- the library ---------------------------------------------------------------------------------------------

def test_captions_only_images_without_one(tmp_path, model_dir):
    folder = dataset(tmp_path / "ds")
    kept = (folder / "img 1.txt").read_bytes()
    seen = []
    report = caption_folder(folder, str(model_dir), prefix="zqx", max_length=5,
                            on_progress=lambda done, total, r: seen.append((done, total, r.path.name)))
    assert txt_files(folder) == {"img 0.txt", "img 1.txt", "img 2.txt", "img 3.txt"}   # not fake, .hidden, side files
    assert (folder / "img 1.txt").read_bytes() == kept
    status = {r.path.name: r.status for r in report.results}
    assert status == {"fake.png": "skipped", "img 0.png": "written", "img 1.png": "kept", "img 2.png": "written",
                      "img 3.png": "written"}
    assert "not" in report.of("skipped")[0].reason                # the scan's own reason (not an image ...)
    assert [s[:2] for s in seen] == [(i, 5) for i in range(1, 6)]
    for name in ("img 0", "img 2", "img 3"):
        raw = (folder / f"{name}.txt").read_bytes()
        text = raw.decode("utf-8")
        assert "\n" not in text and text == " ".join(text.split())
        words = words_after(text, "zqx")
        assert 1 <= len(words) <= 5 and set(words) <= set(WORDS)
        assert next(r for r in report.results if r.path.name == f"{name}.png").caption == text
    assert report.summary().startswith(f"{folder}: 3 written, 1 kept, 0 failed, 1 skipped")


def test_overwrite_suffix_and_length(tmp_path, captioner):
    folder = dataset(tmp_path / "ds")
    report = caption_folder(folder, captioner, overwrite=True, prefix="zqx", suffix="flat colours", max_length=2)
    assert len(report.of("written")) == 4 and not report.of("kept")
    for i in range(4):
        text = (folder / f"img {i}.txt").read_text(encoding="utf-8")
        assert text.startswith("zqx, ") and text.endswith(", flat colours")
        assert len(text[len("zqx, "):-len(", flat colours")].split()) == 2
    # Without a limit the caption is the model's whole output (here: its default token budget of words);
    # without overwrite every caption now stays as it is.
    (folder / "img 0.txt").unlink()
    before = {n: (folder / n).read_bytes() for n in txt_files(folder)}
    report = caption_folder(folder, captioner)
    assert [r.path.name for r in report.of("written")] == ["img 0.png"]
    assert 10 < len((folder / "img 0.txt").read_text(encoding="utf-8").split()) <= 60
    assert all((folder / n).read_bytes() == b for n, b in before.items())


def test_a_blip_model_captions_through_its_own_processor(tmp_path):
    """BLIP ships a processor class (AutoProcessor gives image processor and tokenizer in one)."""
    model = build_blip(tmp_path / "blip-tiny")
    folder = make_style_images(tmp_path / "ds", n=2, captions=False)
    report = caption_folder(folder, str(model), prefix="zqx", max_length=4)
    assert [r.status for r in report.results] == ["written", "written"]
    for r in report.results:
        words = words_after(r.caption, "zqx")
        assert 1 <= len(words) <= 4 and set(words) <= set(WORDS)      # no [SEP] / [DEC] special tokens
        assert (folder / f"{r.path.stem}.txt").read_text(encoding="utf-8") == r.caption
    # the same with a chat template is a chat model: refused at load, not N failures of prompt-less generation
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}",
                                               encoding="utf-8")
    (folder / "img 0.txt").unlink()
    with pytest.raises(CaptionError, match="blip-tiny is a chat vision-language model"):
        caption_folder(folder, str(model))


def test_a_blank_caption_file_is_filled_and_nothing_to_do_loads_no_model(tmp_path, captioner):
    folder = make_style_images(tmp_path / "ds", n=2, captions=True)
    (folder / "img 0.txt").write_text("  \n", encoding="utf-8")      # training uses the template for it
    report = caption_folder(folder, captioner, prefix="zqx")
    assert [r.status for r in report.results] == ["written", "kept"]
    assert (folder / "img 0.txt").read_text(encoding="utf-8").startswith("zqx, ")
    # every image has a caption: a hub id is never fetched, so offline this still succeeds
    report = caption_folder(folder, OFFLINE_ID)
    assert [r.status for r in report.results] == ["kept", "kept"]


def test_models_that_cannot_be_loaded_say_why_in_one_line(tmp_path, model_dir):
    folder = make_style_images(tmp_path / "ds", n=1, captions=False)
    with pytest.raises(CaptionError) as e:
        caption_folder(folder, OFFLINE_ID)
    msg = str(e.value)
    assert "\n" not in msg and f"could not fetch the captioning model '{OFFLINE_ID}'" in msg
    assert "local folder" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match=r"empty is not a model \(it has no config.json\)"):
        caption_folder(folder, str(tmp_path / "empty"))
    with pytest.raises(CaptionError, match="nope does not exist"):
        caption_folder(folder, str(tmp_path / "nope"))
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(tmp_path / "bert")
    with pytest.raises(CaptionError, match="is a 'bert' model, which does not caption images"):
        caption_folder(folder, str(tmp_path / "bert"))
    half = tmp_path / "weights-only"
    half.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model_dir / name, half / name)
    with pytest.raises(CaptionError, match="weights-only has no usable image processor and tokenizer"):
        caption_folder(folder, str(half))
    with pytest.raises(CaptionError, match="max_length=0"):
        caption_folder(folder, OFFLINE_ID, max_length=0)
    assert not txt_files(folder)


def test_an_image_the_model_fails_on_is_reported_and_the_rest_are_captioned(tmp_path, captioner):
    class Flaky(Captioner):
        calls = 0

        def __call__(self, image, max_words=None):
            Flaky.calls += 1
            if Flaky.calls == 2:
                raise RuntimeError("CUDA out of memory\nlong details")
            return super().__call__(image, max_words)
    flaky = Flaky(captioner.name, captioner.model, captioner.processor, captioner.image_processor,
                  captioner.tokenizer, "cpu")
    folder = make_style_images(tmp_path / "ds", n=3, captions=False)
    report = caption_folder(folder, flaky, prefix="zqx")
    assert [r.status for r in report.results] == ["written", "failed", "written"]
    assert report.results[1].reason == "the model failed on it: CUDA out of memory"
    assert txt_files(folder) == {"img 0.txt", "img 2.txt"}


# ---- the CLI -------------------------------------------------------------------------------------------------

def cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_caption(tmp_path, model_dir, capsys):
    folder = dataset(tmp_path / "ds")
    kept = (folder / "img 1.txt").read_bytes()
    code, out, err = cli(capsys, "caption", str(folder), "--model", str(model_dir), "--prefix", "zqx",
                         "--max-length", "3", "--device", "cpu")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 6 and lines[-1].startswith(f"{folder}: 3 written, 1 kept, 0 failed, 1 skipped")
    assert lines[0].startswith("[1/5] fake.png: skipped: ")
    assert "[3/5] img 1.png: kept: my own caption, képt as is" in lines
    assert (folder / "img 1.txt").read_bytes() == kept
    for i in (0, 2, 3):
        text = (folder / f"img {i}.txt").read_text(encoding="utf-8")
        assert f"img {i}.png: written: {text}" in out and len(words_after(text, "zqx")) <= 3


def test_cli_caption_errors_are_one_line(tmp_path, capsys):
    folder = make_style_images(tmp_path / "ds", n=1, captions=False)
    bad = tmp_path / "no" / "such" / "model"
    code, out, err = cli(capsys, "caption", str(folder), "--model", str(bad))
    assert code == 2 and err.count("\n") == 1 and err.startswith("sdlora: error: ") and str(bad) in err
    code, out, err = cli(capsys, "caption", str(folder), "--model", OFFLINE_ID)
    assert code == 2 and err.count("\n") == 1 and OFFLINE_ID in err and "could not fetch" in err
    assert "local folder" in err and "Traceback" not in err
    code, out, err = cli(capsys, "caption", str(tmp_path / "nodata"), "--model", OFFLINE_ID)
    assert code == 2 and "nodata" in err and "does not exist" in err
    assert not txt_files(folder)


# ---- the web UI ----------------------------------------------------------------------------------------------

@pytest.fixture
def ui(tmp_path):
    return WebUI(tmp_path / "outputs", base="tiny-random", datasets_dir=tmp_path / "datasets",
                 upload_dir=tmp_path / "uploads")


def test_webui_caption_button(tmp_path, ui, model_dir):
    with pytest.raises(UserError, match="first"):
        ui.caption_images(str(model_dir), False, "zqx")
    src = make_style_images(tmp_path / "in", n=4, captions=False)
    ui.load_uploads([str(p) for p in sorted(src.glob("*.png"))], "zqx", "an image in {trigger} style", 64)
    ui.set_caption("img 1.png", "zqx, my own words")
    with pytest.raises(UserError, match=f"could not fetch the captioning model '{OFFLINE_ID}'"):
        ui.caption_images(OFFLINE_ID, False, "zqx")
    with pytest.raises(UserError, match="Enter a captioning model"):
        ui.caption_images("  ", False, "zqx")
    report = ui.caption_images(str(model_dir), False, "zqx")
    assert len(report.of("written")) == 3 and len(report.of("kept")) == 1
    rows = {r.name: r for r in ui.dataset.rows()}
    assert rows["img 1.png"].caption == "zqx, my own words"
    for name in ("img 0.png", "img 2.png", "img 3.png"):
        on_disk = (ui.dataset.folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert rows[name].caption == on_disk and words_after(on_disk, "zqx")
        assert not rows[name].notes                               # the trigger is in it: no "trigger added"
    # overwrite with a new trigger word: every card now starts with it, the edited one included
    ui.caption_images(str(model_dir), True, "neonz")
    assert ui.dataset.trigger == "neonz"
    assert all(r.caption.startswith("neonz, ") and "my own words" not in r.caption for r in ui.dataset.rows())


def test_train_tab_has_the_caption_button_wired_to_the_gallery(tmp_path, ui, model_dir):
    from sdlora.webui import page
    demo = page.build(ui)
    by_id = {c.elem_id: c for c in demo.blocks.values() if getattr(c, "elem_id", None)}
    button, box, overwrite = by_id["caption"], by_id["caption-model"], by_id["caption-overwrite"]
    assert button.value == "Caption images" and overwrite.label == "Overwrite existing captions"
    dep = next(d for d in demo.fns.values() if (button._id, "click") in d.targets)
    ids = {b._id for b in dep.inputs} | {b._id for b in dep.outputs}
    assert box._id in ids and overwrite._id in ids
    assert any(type(b).__name__ == "State" for b in dep.outputs)   # the gallery's rev: it re-renders
    # the wired handler itself, as the page calls it: rev goes up (the gallery re-renders), the summary counts
    src = make_style_images(tmp_path / "in", n=3, captions=False)
    ui.load_uploads([str(p) for p in sorted(src.glob("*.png"))], "zqx", "an image in {trigger} style", 64)
    rev, summary = dep.fn(str(model_dir), False, "zqx", 4)
    assert rev == 5 and "3 images ready to train" in summary and "Captions: 3 written, 0 kept" in summary
    assert all(r.caption.startswith("zqx, ") for r in ui.dataset.rows())
    import gradio as gr
    with pytest.raises(gr.Error, match="could not fetch"):
        dep.fn(OFFLINE_ID, True, "zqx", 5)


def test_mixed_shape_uncaptioned_images_train_from_the_web_ui_after_one_click(tmp_path, ui, model_dir):
    """The first-timer's path: portrait, landscape and square pictures with no captions are uploaded, captioned
    by one click, shown in their buckets, and trained; the run records each image's model caption and bucket."""
    import json
    import time

    from PIL import Image

    from sdlora.webui.forms import default_form
    src = tmp_path / "in"
    src.mkdir()
    for name, size in {"tall": (60, 110), "wide": (120, 66), "square": (80, 80), "tall2": (64, 100)}.items():
        Image.new("RGB", size, (20, 30, 200)).save(src / f"{name}.png")
    ui.load_uploads([str(p) for p in sorted(src.glob("*.png"))], "zqx", "an image in {trigger} style", 64)
    report = ui.caption_images(str(model_dir), False, "zqx")
    assert len(report.of("written")) == 4
    shown = ui.dataset.summary()
    assert "Buckets (each image trains at its own shape): " in shown and "48x80" in shown and "80x48" in shown
    form = default_form("tiny-random", len(ui.dataset.items))
    form.update(trigger="zqx", steps=2, sample_every=0)
    job = ui.start(form)
    deadline = time.time() + 300                       # a hang guard, not a speed claim
    while job.alive() and time.time() < deadline:
        time.sleep(0.2)
    assert job.state == "done", job.error
    config = json.loads((job.run_dir / "config.json").read_text())
    for name in ("tall.png", "wide.png", "square.png", "tall2.png"):
        caption = (ui.dataset.folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert config["captions"][name] == caption and words_after(caption, "zqx")
    buckets = {name: tuple(e["bucket"]) for name, e in config["images"].items()}
    assert buckets["tall.png"][0] < buckets["tall.png"][1] and buckets["wide.png"][0] > buckets["wide.png"][1]
    assert buckets["square.png"] == (64, 64)
