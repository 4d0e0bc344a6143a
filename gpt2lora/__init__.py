"""gpt2lora: GPT-2 in plain PyTorch with LoRA, matching transformers + peft numerically."""

from .adapters import load_adapter, save_adapter
from .config import PRESETS, GPT2Config, LoRAConfig
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
from .heads import GPT2ForSequenceClassification
from .hub import save_pretrained
from .lora import LoRALinear, ParameterCount, apply_lora, count_parameters, merge_lora, unmerge_lora
from .methods import METHODS, prepare_model
from .model import GPT2, KVCache
from .tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "METHODS",
    "PRESETS",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "GPT2LoRAError",
    "KVCache",
    "LoRAConfig",
    "LoRALinear",
    "ParameterCount",
    "TrainingError",
    "UnsafeCheckpointError",
    "apply_lora",
    "count_parameters",
    "generate",
    "load_adapter",
    "load_tokenizer",
    "merge_lora",
    "prepare_model",
    "save_adapter",
    "save_pretrained",
    "unmerge_lora",
]
