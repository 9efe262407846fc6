"""The base picker's list: checkpoints and diffusers folders under the models folders, read from headers."""
from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from sdlora.bases import catalog

import sdkit


def _header_only(path, tensors: dict) -> None:
    """A safetensors file with these key names and shapes (zeros): what a header-only reader sees."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.zeros(shape, dtype=torch.float16) for k, shape in tensors.items()}, str(path))


UNET = "model.diffusion_model."


def test_models_dirs_come_from_flags_env_and_the_project(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    dirs = catalog.models_dirs([str(a)], root=tmp_path, env={catalog.ENV: f"{b}{os.pathsep}{a}"})
    assert dirs == [a, b, tmp_path / "models"]            # each once, flags first


def test_find_bases_lists_each_kind_with_its_family_and_leaves_out_non_bases(tmp_path, monkeypatch):
    models = tmp_path / "models"
    sdkit.single_file(models / "Stable-diffusion" / "sd15-style.safetensors", "sd1")
    sdkit.single_file(models / "Stable-diffusion" / "sd21.safetensors", "sd2-v", say_variant=True)
    sdkit.single_file(models / "Stable-diffusion" / "sd21-unsaid.safetensors", "sd2")
    sdkit.diffusers_folder(models / "diffusers" / "my-sd15", "sd1")
    _header_only(models / "Lora" / "neon.safetensors", {"lora_unet_x.lora_down.weight": (4, 8)})
    _header_only(models / "checkpoints" / "xl.safetensors", {
        "conditioner.embedders.1.model.ln_final.weight": (8,),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048)})
    _header_only(models / "checkpoints" / "refiner.safetensors", {
        "conditioner.embedders.0.model.ln_final.weight": (8,),
        UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 1280)})
    _header_only(models / "checkpoints" / "inpaint.safetensors", {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
        UNET + "input_blocks.0.0.weight": (8, 9, 3, 3),
        UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 768)})
    (models / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")
    (models / "notes.txt").write_text("not a model")
    import safetensors.torch

    def no_loading(*a, **k):
        raise AssertionError("the picker loaded tensors; it reads headers only")
    for module, name in ((torch, "load"), (safetensors.torch, "load_file"), (safetensors.torch, "load")):
        monkeypatch.setattr(module, name, no_loading)
    entries = catalog.find_bases([models])
    by_name = {e.name: e for e in entries}
    assert entries[0] is catalog.BUILTIN and entries[0].value == "tiny"
    assert set(by_name) == {"tiny (built in)", "Stable-diffusion/sd15-style.safetensors",
                            "Stable-diffusion/sd21.safetensors", "Stable-diffusion/sd21-unsaid.safetensors",
                            "diffusers/my-sd15", "checkpoints/xl.safetensors", "checkpoints/inpaint.safetensors",
                            "checkpoints/refiner.safetensors",
                            "checkpoints/old.ckpt"}                      # no LoRA, no text file
    sd15 = by_name["Stable-diffusion/sd15-style.safetensors"]
    assert (sd15.family, sd15.detail, sd15.problem) == ("sd1", "SD 1.x", "")
    assert sd15.value == str(models / "Stable-diffusion" / "sd15-style.safetensors")
    assert sd15.size == os.path.getsize(sd15.value) and "MB" in sd15.label and "SD 1.x" in sd15.label
    assert by_name["Stable-diffusion/sd21.safetensors"].detail == "SD 2.x, v-prediction (768 px)"
    assert "assumed" in by_name["Stable-diffusion/sd21-unsaid.safetensors"].detail
    folder = by_name["diffusers/my-sd15"]
    assert folder.family == "sd1" and "diffusers folder" in folder.detail and folder.size > 0 and not folder.problem
    xl = by_name["checkpoints/xl.safetensors"]
    assert (xl.family, xl.detail, xl.problem) == ("sdxl", "SDXL", "")
    refiner = by_name["checkpoints/refiner.safetensors"]
    assert refiner.family == "sdxl" and "refiner" in refiner.problem
    assert "inpainting" in by_name["checkpoints/inpaint.safetensors"].problem
    assert ".safetensors" in by_name["checkpoints/old.ckpt"].problem


def test_missing_or_empty_models_folders_give_just_the_built_in_base(tmp_path):
    assert catalog.find_bases([tmp_path / "nope", tmp_path]) == [catalog.BUILTIN]
