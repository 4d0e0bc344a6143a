"""gpt2lora: GPT-2 in plain PyTorch with LoRA, matching transformers + peft numerically.

The names here are what users call; everything else stays importable from its module
(``gpt2lora.data.batching.PaddingStats``, ``gpt2lora.training.trainer.lr_at_step``, ``gpt2lora.app.report.markdown_table`` ...).
"""

from .app.run import load_run_model, run, smoke_checkpoint
from .app.runconfig import RunConfig
from .config import PRESETS, GPT2Config, LoRAConfig, TrainConfig
from .data.batching import BucketedBatches, collate, lm_example
from .data.tasks import TASKS, Dataset, alpaca_prompt, encode, load_split
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
from .model.classifier import GPT2ForSequenceClassification
from .model.generate import generate
from .model.gpt2 import GPT2
from .model.hub import save_pretrained
from .model.tokenizer import load_tokenizer
from .peft.diagnostics import AdapterDiagnostics, diagnose, format_diagnostics, inspect_adapter
from .peft.files import load_adapter, save_adapter
from .peft.lora import LoRALinear, apply_lora, count_parameters, merge_lora, unmerge_lora
from .peft.methods import METHODS, prepare_model
from .peft.named import add_adapter, combine_adapters, delete_adapter, disable_adapters, set_adapter
from .peft.prompt import PromptConfig, apply_prompt
from .training.evaluation import evaluate
from .training.history import History
from .training.metrics import accuracy, confusion_matrix, perplexity, precision_recall_f1, squad_metrics
from .training.trainer import Trainer

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
