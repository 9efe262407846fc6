"""sdlora: train Stable Diffusion style LoRAs that load everywhere.

Public API::

    from sdlora import DataConfig, LoraSpec, TrainConfig, GenerateConfig, train, Generator, LoraChoice

    result = train(DataConfig(folder="datasets/neon", trigger="neonstyle"))
    gen = Generator("tiny")
    image = gen.generate(GenerateConfig(prompt="a red circle, neonstyle"), [LoraChoice(str(result.lora_path), 0.8)])
"""
import logging

# bitsandbytes (imported by PEFT when installed) warns on every start on CPUs with AVX512-bf16 that an optional
# inference kernel from the model hub is missing; sdlora does not use that kernel (sdlora.bases.precision).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from sdlora.version import __version__  # noqa: E402

from sdlora.config import ConfigError, DataConfig, GenerateConfig, LoraSpec, TrainConfig, default_steps  # noqa: E402
from sdlora.generate import Generator, LoraChoice, read_lora  # noqa: E402
from sdlora.bases.load import Base, BaseModelError, load_base  # noqa: E402
from sdlora.training.events import Callbacks, StepInfo, TrainResult  # noqa: E402
from sdlora.training.loop import TrainingError, plan, train  # noqa: E402

__all__ = ["__version__", "ConfigError", "DataConfig", "GenerateConfig", "LoraSpec", "TrainConfig", "default_steps",
           "Generator", "LoraChoice", "read_lora", "Base", "BaseModelError", "load_base", "Callbacks", "StepInfo",
           "TrainingError", "TrainResult", "plan", "train"]
