"""The one table of Stable Diffusion base families, and of the variants sdlora can load.

A *family* is what a LoRA file is for: its modules fit every base of the family
and none of another (SD 1.x and SD 2.x differ in text width, 768 vs 1024;
SDXL has two text encoders and 2048-wide cross-attention). A *variant* is one
bundled config of a family: its image size and what its U-Net predicts
(noise, "epsilon", or velocity, "v_prediction"); SD 2.x has two.

Every other module asks this table: the loaders (which config folder), the
LoRA readers (which family a file is for), the metadata writers (kohya's
``ss_*`` and ModelSpec names, A1111's sidecar), the checks and the UI. Names
are validated here and nowhere else.

Sources of the strings: kohya-ss ``library/sai_model_spec.py`` and
``train_network.py`` (ModelSpec architecture, ``ss_base_model_version``);
A1111 ``extensions-builtin/Lora/network.py`` (``ss_v2``, the sidecar's
"sd version"); the diffusers configs of runwayml/stable-diffusion-v1-5,
stabilityai/stable-diffusion-2-1 (768, v) and -2-1-base (512, epsilon); SDXL's from kohya-ss
``library/sdxl_model_util.py`` and Stability-AI/generative-models ``configs/inference/sd_xl_base.yaml``
(docs/SDXL.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """What a LoRA is for; files of one family load on every base of it."""
    name: str                  # "sd1" | "sd2" | "sdxl": the spelling every module uses
    title: str                 # shown to users
    context_dim: int           # U-Net cross-attention width (= a LoRA's attn2 to_k/to_v in_features)
    text_width: int | None     # CLIP width of the (single) text encoder; None: two encoders
    ss_base_model_version: str  # kohya's metadata; A1111 hides LoRAs whose version does not fit the model
    ss_version_prefix: str     # how every ss_base_model_version of the family starts
    ss_v2: str                 # "True" for SD 2.x (kohya, A1111)
    sidecar_version: str       # A1111's <name>.json "sd version"
    modelspec_implementation: str  # ModelSpec 1.0.1 "implementation"
    modelspec_prefix: str      # how every ModelSpec architecture of the family starts
    loadable: bool             # sdlora can load a base of this family


@dataclass(frozen=True)
class Variant:
    """One bundled base configuration (sdlora/configs/<config_folder>)."""
    name: str                  # "sd1", "sd2-v", "sd2-base"
    family: str
    config_folder: str         # folder name under sdlora/configs
    prediction_type: str       # "epsilon" | "v_prediction" (diffusers scheduler config)
    resolution: int            # native image size in px
    modelspec_architecture: str  # ModelSpec 1.0.1 "architecture" (a LoRA adds "/lora")
    aliases: tuple[str, ...] = ()  # older spellings accepted on input


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("sd1", "SD 1.x", 768, 768, "sd_v1", "sd_v1", "False", "SD1", "diffusers", "stable-diffusion-v1", True),
    Family("sd2", "SD 2.x", 1024, 1024, "sd_v2", "sd_v2", "True", "SD2", "diffusers", "stable-diffusion-v2", True),
    Family("sdxl", "SDXL", 2048, None, "sdxl_base_v1-0", "sdxl_", "False", "SDXL",
           "https://github.com/Stability-AI/generative-models", "stable-diffusion-xl", True),
)}

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("sd1", "sd1", "sd15", "epsilon", 512, "stable-diffusion-v1", ("sd15",)),
    Variant("sd2-v", "sd2", "sd21", "v_prediction", 768, "stable-diffusion-v2-768-v", ("sd21",)),
    Variant("sd2-base", "sd2", "sd21-base", "epsilon", 512, "stable-diffusion-v2-512", ("sd21-base",)),
    Variant("sdxl", "sdxl", "sdxl", "epsilon", 1024, "stable-diffusion-xl-v1-base", ("sdxl-base",)),
)}

# The variant a family name stands for when nothing else is known (SD 2.x: the 768 v model, as
# diffusers' single-file loader also assumes).
DEFAULT_VARIANT = {"sd1": "sd1", "sd2": "sd2-v", "sdxl": "sdxl"}
UNKNOWN = "unknown"
SDXL_ARCHITECTURE = "stable-diffusion-xl-v1-base"


class FamilyError(ValueError):
    """A family or variant name that sdlora does not know."""


def family(name: str) -> Family:
    """The family of a family or variant name (aliases included); FamilyError names what is allowed."""
    if name in FAMILIES:
        return FAMILIES[name]
    return FAMILIES[variant(name).family]


def variant(name: str) -> Variant:
    """A variant by its name, an alias (sd15, sd21, sd21-base) or a family name (its default variant)."""
    if name in VARIANTS:
        return VARIANTS[name]
    if name in DEFAULT_VARIANT:
        return VARIANTS[DEFAULT_VARIANT[name]]
    for v in VARIANTS.values():
        if name in v.aliases:
            return v
    if name in FAMILIES:
        raise FamilyError(f"family={name!r} ({FAMILIES[name].title}) has no base config sdlora can load yet")
    allowed = sorted(set(FAMILIES) | set(VARIANTS) | {a for v in VARIANTS.values() for a in v.aliases})
    raise FamilyError(f"family={name!r} is not known: use one of {', '.join(allowed)}")


def title(name: str) -> str:
    """"SD 1.x" for "sd1" (any spelling); "an unknown base" for "unknown"."""
    return "an unknown base" if name == UNKNOWN else family(name).title


def variant_for(family_name: str, prediction_type: str) -> Variant | None:
    """The bundled variant of a family with this prediction type ("v" and "v_prediction" both work)."""
    pred = "v_prediction" if prediction_type in ("v", "v_prediction") else prediction_type
    return next((v for v in VARIANTS.values() if v.family == family_name and v.prediction_type == pred), None)


def by_context_dim(width: int | None) -> str:
    """Family name from the U-Net's cross-attention width; "unknown" when none fits."""
    return next((f.name for f in FAMILIES.values() if f.context_dim == width), UNKNOWN)


def by_text_width(width: int | None) -> str:
    """Family name from a single text encoder's width (768 CLIP ViT-L, 1024 OpenCLIP ViT-H)."""
    return next((f.name for f in FAMILIES.values() if f.text_width is not None and f.text_width == width), UNKNOWN)


def by_ss_version(version: str) -> str:
    """Family name from kohya's ss_base_model_version ("sd_v1", "sdxl_base_v1-0", ...)."""
    return next((f.name for f in FAMILIES.values() if version.startswith(f.ss_version_prefix)), UNKNOWN)


def by_ss_v2(v2: str) -> str:
    """Family name from kohya's ss_v2 alone (pre-SDXL files carry only that): "True" is SD 2.x."""
    return next((f.name for f in FAMILIES.values() if f.name != "sdxl" and f.ss_v2 == v2), UNKNOWN)


def by_architecture(arch: str) -> str:
    """Family name from a ModelSpec architecture ("stable-diffusion-v1/lora", ...)."""
    return next((f.name for f in FAMILIES.values() if arch.startswith(f.modelspec_prefix)), UNKNOWN)


def modelspec_architecture(family_name: str, prediction_type: str) -> str:
    """ModelSpec architecture of a base: SD 2.x 768-v and 512 differ; SDXL has its own."""
    if family_name == "sdxl":
        return SDXL_ARCHITECTURE
    v = variant_for(family_name, prediction_type) or variant(family_name)
    return v.modelspec_architecture


__all__ = ["Family", "Variant", "FAMILIES", "VARIANTS", "FamilyError", "UNKNOWN", "family", "variant", "title",
           "variant_for", "by_context_dim", "by_text_width", "by_ss_version", "by_ss_v2", "by_architecture",
           "modelspec_architecture"]
