"""gpt2lora: GPT-2 in plain PyTorch with LoRA, matching transformers + peft numerically."""

from .adapters import load_adapter, save_adapter
from .batching import BucketedBatches, PaddingStats, collate, lm_example
from .config import PRESETS, GPT2Config, LoRAConfig, TrainConfig
from .data import TASKS, Dataset, alpaca_prompt, load_split
from .distributed import is_main_process
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
from .lora import (
    LoRALinear,
    ParameterCount,
    QKVLoRALinear,
    TiedLoRALinear,
    apply_lora,
    count_parameters,
    merge_lora,
    unmerge_lora,
)
from .methods import METHODS, prepare_model
from .metrics import (
    accuracy,
    classification_metrics,
    confusion_matrix,
    exact_match,
    instruction_metrics,
    perplexity,
    precision_recall_f1,
    rouge_l,
    squad_f1,
    squad_metrics,
)
from .model import GPT2, KVCache
from .prompt import PromptConfig, apply_prompt
from .report import markdown_table
from .tokenizer import load_tokenizer
from .history import History
from .train import Trainer, enable_gradient_checkpointing, lr_at_step

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "METHODS",
    "PRESETS",
    "TASKS",
    "BucketedBatches",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "Dataset",
    "GPT2Config",
    "GPT2ForSequenceClassification",
    "GPT2LoRAError",
    "History",
    "KVCache",
    "LoRAConfig",
    "LoRALinear",
    "PaddingStats",
    "ParameterCount",
    "PromptConfig",
    "QKVLoRALinear",
    "TiedLoRALinear",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "UnsafeCheckpointError",
    "accuracy",
    "alpaca_prompt",
    "apply_lora",
    "apply_prompt",
    "classification_metrics",
    "collate",
    "confusion_matrix",
    "count_parameters",
    "enable_gradient_checkpointing",
    "exact_match",
    "generate",
    "instruction_metrics",
    "is_main_process",
    "lm_example",
    "load_adapter",
    "load_split",
    "load_tokenizer",
    "lr_at_step",
    "markdown_table",
    "merge_lora",
    "perplexity",
    "precision_recall_f1",
    "prepare_model",
    "rouge_l",
    "save_adapter",
    "save_pretrained",
    "squad_f1",
    "squad_metrics",
    "unmerge_lora",
]
