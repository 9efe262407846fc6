"""The committed tiny base model (sdlora/base_model) meets its quality bar.

Loads it offline with diffusers exactly as a user's SD 1.5 folder is loaded,
draws held-out colour-shape prompts (pairs the build never showed together)
with fixed seeds, and judges each image with sdlora.scenes.measure: the
dominant saturated colour, and the shape template that best fits the
foreground's bounding box.
"""
import json
from pathlib import Path

import pytest
import torch

from sdlora import scenes
from sdlora.tinybase import SD_SCHEDULE
from sdlora.tinybase_card import evaluate, held_out_prompts

BASE = Path(__file__).resolve().parent.parent / "sdlora" / "base_model"
pytestmark = pytest.mark.skipif(not (BASE / "model_index.json").is_file(), reason="tiny base model not built")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    pipe = StableDiffusionPipeline.from_pretrained(BASE, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def build_info():
    return json.loads((BASE / "build.json").read_text())


def test_architecture_is_stable_diffusion(pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert any("CrossAttn" in b for b in pipe.unet.config.down_block_types)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == scenes.IMAGE_SIZE
    assert 0.05 < pipe.vae.config.scaling_factor < 20


def test_scheduler_is_sd_schedule(pipe):
    cfg = pipe.scheduler.config
    assert cfg.num_train_timesteps == 1000
    assert cfg.beta_schedule == "scaled_linear"
    assert cfg.beta_start == pytest.approx(0.00085) and cfg.beta_end == pytest.approx(0.012)
    assert cfg.prediction_type == "epsilon"
    assert SD_SCHEDULE["prediction_type"] == "epsilon"


def test_training_choices_recorded(build_info):
    assert build_info["config"]["empty_caption_p"] == pytest.approx(0.1)
    assert build_info["schedule"]["beta_schedule"] == "scaled_linear"
    readme = (BASE / "README.md").read_text()
    assert "10%" in readme and "empty caption" in readme.lower()
    assert [tuple(p) for p in build_info["held_out"]] == list(scenes.HELD_OUT)


def test_weights_within_budget():
    size = sum(p.stat().st_size for p in BASE.rglob("*.safetensors"))
    assert size <= 25 * 1024 * 1024, f"{size / 2**20:.1f} MiB of weights"


def test_held_out_prompts_are_never_trained():
    import random
    rng = random.Random(0)
    seen = {(s.colour, s.shape) for s in (scenes.random_scene(rng) for _ in range(3000))}
    assert not seen & set(scenes.HELD_OUT)
    assert len(held_out_prompts()) >= 24


def test_quality_bar_on_held_out_prompts(pipe, build_info):
    cfg = build_info["config"]
    result = evaluate(pipe, steps=cfg["sample_steps"], guidance=cfg["guidance"], seed=0)
    assert result["colour_acc"] >= 0.90, f"colour {result['colour_acc']:.0%}: {result['measured']}"
    assert result["shape_acc"] >= 0.70, f"shape {result['shape_acc']:.0%}: {result['measured']}"
