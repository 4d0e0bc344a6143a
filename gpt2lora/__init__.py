"""gpt2lora: GPT-2 in plain PyTorch with LoRA, matching transformers + peft numerically.

The names here are what users call; everything else stays importable from its module
(``gpt2lora.batching.PaddingStats``, ``gpt2lora.train.lr_at_step``, ``gpt2lora.report.markdown_table`` ...).
"""

from .adapters import load_adapter, save_adapter
from .batching import BucketedBatches, collate, lm_example
from .config import PRESETS, GPT2Config, LoRAConfig, TrainConfig
from .data import TASKS, Dataset, alpaca_prompt, encode, load_split
from .diagnostics import diagnose, format_diagnostics, inspect_adapter
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    DataError,
    GPT2LoRAError,
    HubError,
    TrainingError,
    UnsafeCheckpointError,
)
from .evaluation import evaluate
from .generate import generate
from .heads import GPT2ForSequenceClassification
from .history import History
from .hub import save_pretrained
from .lora import LoRALinear, apply_lora, count_parameters, merge_lora, unmerge_lora
from .methods import METHODS, prepare_model
from .metrics import accuracy, confusion_matrix, perplexity, precision_recall_f1, squad_metrics
from .model import GPT2
from .named import add_adapter, combine_adapters, delete_adapter, disable_adapters, set_adapter
from .prompt import PromptConfig, apply_prompt
from .run import load_run_model, run, smoke_checkpoint
from .runconfig import RunConfig
from .tokenizer import load_tokenizer
from .train import Trainer

__version__ = "0.1.0"

__all__ = [
    "GPT2",
    "METHODS",
    "PRESETS",
    "TASKS",
    "AdapterDiagnostics",
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
    "HubError",
    "LoRAConfig",
    "LoRALinear",
    "PromptConfig",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "TrainingError",
    "UnsafeCheckpointError",
    "accuracy",
    "add_adapter",
    "alpaca_prompt",
    "apply_lora",
    "apply_prompt",
    "collate",
    "combine_adapters",
    "confusion_matrix",
    "count_parameters",
    "delete_adapter",
    "diagnose",
    "disable_adapters",
    "encode",
    "evaluate",
    "format_diagnostics",
    "generate",
    "inspect_adapter",
    "lm_example",
    "load_adapter",
    "load_run_model",
    "load_split",
    "load_tokenizer",
    "merge_lora",
    "perplexity",
    "precision_recall_f1",
    "prepare_model",
    "run",
    "save_adapter",
    "save_pretrained",
    "set_adapter",
    "smoke_checkpoint",
    "squad_metrics",
    "unmerge_lora",
]
