"""How a kohya-format file names a base's modules, per family.

SD 1.x / 2.x: ``lora_unet_`` + the diffusers U-Net path, ``lora_te_`` + the CLIP path (dots as underscores).
SDXL (kohya-ss sd-scripts ``networks/lora.py`` with ``library/sdxl_original_unet.py``): the U-Net under its
original SGM names (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q``), CLIP ViT-L as
``lora_te1_`` and OpenCLIP bigG as ``lora_te2_``, both in transformers' names
(``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``). AUTOMATIC1111, ComfyUI, Forge and diffusers all
read that naming; ComfyUI and diffusers also read the U-Net under its diffusers names, which the reader here
accepts too (files from other trainers). The rules and their sources: docs/SDXL.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sdlora.bases.ldm_unet import UnetLayout, unet_path_to_ldm
from sdlora.loras.layouts import canonical_key


@dataclass(frozen=True)
class Naming:
    """kohya module names of one base's modules."""
    family: str
    prefixes: dict[str, str]                                   # component -> kohya prefix
    unet_names: dict[str, str] = field(default_factory=dict)   # diffusers U-Net path -> the path files use

    def name(self, key: str) -> str:
        """The name a file of this family gives module `key` ("unet.<diffusers path>", "text_encoder.<path>")."""
        component, path = canonical_key(key).split(".", 1)
        if component == "unet" and self.unet_names:
            if path not in self.unet_names:
                raise ValueError(f"{key}: no module of this base's U-Net; its original name is unknown")
            path = self.unet_names[path]
        if component not in self.prefixes:
            raise ValueError(f"{key}: a {component} module, which a {self.family} base does not have")
        return f"{self.prefixes[component]}_{path.replace('.', '_')}"

    def names(self, key: str) -> list[str]:
        """Every name a reader accepts for module `key`: the one written, then the diffusers spelling of an
        SDXL U-Net module (ComfyUI's model_lora_keys_unet and diffusers' loader both read it)."""
        out = [self.name(key)]
        component, path = canonical_key(key).split(".", 1)
        if component == "unet" and self.unet_names:
            out.append(f"{self.prefixes['unet']}_{path.replace('.', '_')}")
        return out


SD_NAMING = Naming("sd1", {"unet": "lora_unet", "text_encoder": "lora_te"})
SDXL_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def sdxl_naming(unet_paths, unet_config: dict) -> Naming:
    """SDXL's naming for a U-Net with these module paths and this diffusers config."""
    layout = UnetLayout.from_config(dict(unet_config))
    names = {}
    for path in unet_paths:
        ldm = unet_path_to_ldm(path, layout)
        if ldm is not None:
            names[path] = ldm
    return Naming("sdxl", dict(SDXL_PREFIXES), names)


def naming_for(base) -> Naming:
    """The naming of a loaded base's family (its U-Net read once per base)."""
    if base.family != "sdxl":
        return SD_NAMING
    cached = getattr(base, "_kohya_naming", None)
    if cached is None:
        cached = sdxl_naming(base.module_names()["unet"], base.unet.config)
        object.__setattr__(base, "_kohya_naming", cached)
    return cached


__all__ = ["Naming", "SD_NAMING", "SDXL_PREFIXES", "sdxl_naming", "naming_for"]
