"""Exceptions raised by gpt2lora. Each message names what was wrong and what was expected."""


class GPT2LoRAError(Exception):
    """Base class of every error gpt2lora raises on purpose."""


class ConfigError(GPT2LoRAError, ValueError):
    """An argument or configuration field has a value gpt2lora cannot use."""


class CheckpointError(GPT2LoRAError, ValueError):
    """A checkpoint or adapter folder is malformed: bad JSON, wrong keys or shapes, corrupt tensors."""


class CheckpointNotFoundError(GPT2LoRAError, FileNotFoundError):
    """A checkpoint, adapter or one of its files does not exist."""


class UnsafeCheckpointError(CheckpointError):
    """A folder holds only pickle weights, which gpt2lora refuses to load."""


class DataError(GPT2LoRAError, ValueError):
    """A dataset file or batch is malformed: names the file, line and field."""


class SplitNotFoundError(DataError):
    """A dataset (a local folder or a hub repository) has no such split."""


class TrainingError(GPT2LoRAError, RuntimeError):
    """Training cannot go on (for example a non-finite loss); names the step."""


class HubError(GPT2LoRAError, RuntimeError):
    """A request to the Hugging Face hub failed (an upload); names the repository, revision and step."""
