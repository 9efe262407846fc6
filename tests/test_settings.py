"""Every training setting is declared once (sdlora.config) and reaches both front ends with the same default.

These read the real front ends: the CLI's argparse parser and the web UI's Gradio page, not the
declarations they are made from.
"""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from sdlora import cli
from sdlora.bases.load import native_resolution
from sdlora.config import ConfigError, DataConfig, LoraSpec, TrainConfig, settings
from sdlora.training.plan import resolve, suggested
from sdlora.webui.forms import build_configs, default_form

# Settings only the Python API reaches, on purpose: lists that neither front end edits yet.
API_ONLY = {"extra_targets", "sample_prompts", "sample_seeds"}
# Settings the web UI sets itself rather than showing: the uploaded dataset's folder, the server's --outputs.
MANAGED = {"folder", "output_dir"}


def cli_flags() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    cli._train_parser(parser.add_subparsers())
    train = next(a for a in parser._subparsers._group_actions[0].choices.values())
    return {a.dest: a for a in train._actions if a.dest != "help"}


@pytest.fixture(scope="module")
def page_controls():
    """{setting name: Gradio component} of the real page, found by the f-<name> ids the page gives them."""
    from sdlora.webui.page import build
    from sdlora.webui.state import WebUI
    import tempfile
    ui = WebUI(tempfile.mkdtemp(), base="tiny-random", datasets_dir=tempfile.mkdtemp())
    demo = build(ui)
    return {b.elem_id[2:]: b for b in demo.blocks.values() if (b.elem_id or "").startswith("f-")}


def test_every_training_setting_is_in_both_front_ends(page_controls):
    flags = cli_flags()
    for s in settings():
        if s.name in API_ONLY:
            assert s.name not in flags and s.name not in page_controls, s.name
            continue
        assert s.name in flags, f"{s.name} has no CLI flag"
        if s.name in MANAGED:
            assert s.ui == "managed" and s.name not in page_controls
        else:
            assert s.name in page_controls, f"{s.name} is in the CLI but not on the web UI's page"
    assert set(page_controls) <= {s.name for s in settings()}
    assert set(flags) - {"resume"} == {s.name for s in settings()} - API_ONLY


def test_the_page_shows_each_declared_default_and_label(page_controls):
    want = default_form("tiny-random")
    for name, control in page_controls.items():
        s = next(x for x in settings() if x.name == name)
        assert control.label == s.label
        value = control.value
        assert value == want[name] or (value in (None, "") and want[name] in (None, "")), (name, value, want[name])


@pytest.mark.parametrize("n_images", [4, 12])
def test_cli_and_web_ui_train_with_the_same_settings_for_the_same_dataset(tmp_path, n_images):
    """The configs each front end builds for a dataset when the user changes nothing, once training has
    filled the derived settings: identical (the folders aside, which each front end names itself)."""
    from conftest import make_style_images
    folder = make_style_images(tmp_path / "data", n=n_images)
    base = "tiny-random"
    from_cli = cli._configs(argparse.Namespace(**{**{a: None for a in cli_flags()}, "folder": str(folder),
                                                  "base": base}))
    from_ui = build_configs(default_form(base, n_images), str(folder), base, str(tmp_path / "outputs"))

    def trained(data: DataConfig, spec: LoraSpec, cfg: TrainConfig):
        spec, cfg, _ = resolve(spec, cfg, n_images, base)
        data = dataclasses.replace(data, resolution=data.resolution or native_resolution(base))
        return (dataclasses.asdict(data), dataclasses.asdict(spec),
                {k: v for k, v in dataclasses.asdict(cfg).items() if k != "output_dir"})
    assert trained(*from_cli) == trained(*from_ui)
    s = suggested(n_images, base)
    assert trained(*from_cli)[1]["rank"] == s["rank"] == (4 if n_images < 8 else 8)
    assert trained(*from_cli)[2]["steps"] == s["steps"] == max(400, 100 * n_images)


def test_a_bad_value_names_the_setting_in_both_front_ends(tmp_path, capsys):
    for name, bad in (("rank", 0), ("dropout", 1.5), ("schedule", "linear"), ("trigger_isolation", -1.0)):
        s = next(x for x in settings() if x.name == name)
        with pytest.raises(ConfigError, match=f"{name}="):
            build_configs({**default_form("tiny-random"), name: bad}, str(tmp_path), "tiny-random", str(tmp_path))
        try:
            code = cli.main(["train", "--data", str(tmp_path), s.flag, str(bad)])
        except SystemExit as e:                  # argparse refuses a choice itself, naming the flag
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and (f"{name}={bad!r} is not allowed" in err or
                              f"argument {s.flag}: invalid choice: {bad!r}" in err), err
