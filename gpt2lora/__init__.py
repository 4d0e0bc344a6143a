"""gpt2lora: GPT-2 in plain PyTorch with LoRA, matching transformers + peft numerically."""

from .config import PRESETS, GPT2Config
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    GPT2LoRAError,
    TrainingError,
    UnsafeCheckpointError,
)
from .generate import generate
from .hub import save_pretrained
from .model import GPT2, KVCache
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "PRESETS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "GPT2Config",
    "GPT2LoRAError",
    "KVCache",
    "TrainingError",
    "UnsafeCheckpointError",
    "generate",
    "load_tokenizer",
    "save_pretrained",
]
