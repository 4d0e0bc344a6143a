"""What a server holds: one base model, its named LoRA adapters (loaded from run or adapter folders), the
tokenizer and the engine; classification adapters on classifier copies of the base, one per label count."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...constants import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, RUN_CONFIG_FILE
from ...data.tasks import CLASSIFICATION_KINDS
from ...devices import PRECISION_DTYPES, resolve_device, resolve_precision
from ...errors import CheckpointError, ConfigError
from ...model.classifier import GPT2ForSequenceClassification
from ...model.gpt2 import GPT2
from ...model.tokenizer import load_tokenizer
from ...peft.files import load_adapter
from ...peft.layers import lora_modules
from ...peft.lora import adapter_configs
from ...peft.named import delete_adapter, set_adapter
from ...peft.registry import adapter_registry
from ...peft.slots import check_adapter_name
from .engine import BASE, Engine


class Forbidden(ConfigError):
    """A path outside the folder adapters may be loaded from at run time."""


class NotFound(ConfigError):
    """An unknown model or adapter name."""


@dataclass
class Adapter:
    """One served adapter: what ``/v1/models`` lists and how requests reach it."""

    name: str
    kind: str
    """``generate`` (completions and chat) or ``classify``."""
    path: str
    label_names: list[str] = field(default_factory=list)
    created: int = field(default_factory=lambda: int(time.time()))


def adapter_source(path: str | os.PathLike) -> tuple[Path, str, list[str]]:
    """The adapter folder inside a run folder or adapter folder ``path``, its kind and its label names."""
    folder = Path(path)
    run_config = folder / RUN_CONFIG_FILE
    if (folder / ADAPTER_CONFIG_FILE).is_file():
        adapter, labels = folder, []
        if run_config.is_file():  # an adapter folder beside a copy of the base config is still an adapter
            run_config = folder / "no-run-config"
    elif run_config.is_file() and (folder / "adapter" / ADAPTER_CONFIG_FILE).is_file():
        adapter = folder / "adapter"
    else:
        raise CheckpointError(f"{folder}: neither an adapter folder ({ADAPTER_CONFIG_FILE}) nor a run folder "
                              f"(config.json and adapter/{ADAPTER_CONFIG_FILE})")
    if run_config.is_file():
        try:
            run = json.loads(run_config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{run_config} is not valid JSON: {err}") from None
        if run.get("method") != "lora":
            raise ConfigError(f"{folder}: the run trained method {run.get('method')!r}; serve runs LoRA adapters "
                              "(several share one base model), so train with method 'lora'")
        kind = "classify" if run.get("kind") in CLASSIFICATION_KINDS else "generate"
        labels = [str(n) for n in run.get("label_names") or []]
        return adapter, kind, labels
    try:
        config = json.loads((adapter / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{adapter / ADAPTER_CONFIG_FILE} is not valid JSON: {err}") from None
    return adapter, "classify" if config.get("task_type") == "SEQ_CLS" else "generate", []


def head_size(adapter: Path) -> int:
    """Number of classes of a classification adapter: the rows of the head it saves."""
    from safetensors import safe_open

    path = adapter / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{adapter}: no {ADAPTER_WEIGHTS_FILE}")
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            if key.endswith(("score.weight", "score.modules_to_save.weight")):
                return int(f.get_slice(key).get_shape()[0])
    raise CheckpointError(f"{path}: a classification adapter but no score head tensor (score.weight)")


def inside_root(root: str | os.PathLike, relative: str) -> Path:
    """``relative`` under ``root``, refused (:class:`Forbidden`) if absolute, if it has ``..``, or if it
    resolves (symlinks followed) outside ``root``."""
    if not isinstance(relative, str) or not relative.strip():
        raise ConfigError("lora_path: expected a folder path relative to the adapter root")
    if os.path.isabs(relative) or relative.startswith(("~", "\\")):
        raise Forbidden(f"lora_path {relative!r}: absolute paths are refused; give a path relative to the "
                        "adapter root")
    if ".." in Path(relative).parts:
        raise Forbidden(f"lora_path {relative!r}: '..' is refused; give a path inside the adapter root")
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise Forbidden(f"lora_path {relative!r} resolves outside the adapter root (a symlink out of it)")
    return target


class ServedModels:
    """The base model, its adapters, the tokenizer and the engine of one server.

    ``adapters`` maps served names to run or adapter folders. Everything that changes a model runs on the
    engine thread (:meth:`Engine.call`), between decoding steps.
    """

    def __init__(self, base: str, adapters: dict[str, str] | None = None, name: str | None = None,
                 device: str = "auto", precision: str = "fp32", max_batch: int = 16, max_queue: int = 256,
                 max_tokens: int | None = None, huge_pages: bool = False) -> None:
        self.device = resolve_device(device, "--device")
        self.precision = resolve_precision(precision, self.device, "--precision", inference=True)
        self.dtype = PRECISION_DTYPES[self.precision]
        self.base_path = base
        self.name = name or base
        # a server decodes for long: the base's weights on 2 MB pages repay their slower load (gpt2lora.model.pages)
        self.model = GPT2.from_pretrained(base, dtype=self.dtype, device=self.device, huge_pages=huge_pages).eval()
        self.tokenizer = load_tokenizer(base)
        self.eos = self.tokenizer.eot_token
        self.context = self.model.config.n_positions
        self.max_tokens = max_tokens or self.context
        if not 1 <= self.max_tokens <= self.context:
            raise ConfigError(f"--max-tokens {max_tokens}: expected 1 to the context length {self.context}")
        self.classifiers: dict[int, nn.Module] = {}
        self.adapters: dict[str, Adapter] = {}
        self.created = int(time.time())
        for adapter_name, path in (adapters or {}).items():
            self._load(adapter_name, path)
        self.engine = Engine(self.model, self.eos, max_batch=max_batch, max_queue=max_queue, device=self.device)

    # ------------------------------------------------------------------ adapters (engine thread)

    def _load(self, name: str, path: str | os.PathLike) -> Adapter:
        check_adapter_name(name, "adapter name")
        if name in self.adapters or name == self.name:
            raise ConfigError(f"adapter name {name!r} is taken already; unload it first or choose another")
        folder, kind, labels = adapter_source(path)
        if kind == "classify":
            classes = head_size(folder)
            model = self.classifiers.get(classes)
            if model is None:
                model = GPT2ForSequenceClassification.from_pretrained(
                    self.base_path, num_labels=classes, dtype=self.dtype, device=self.device).eval()
            load_adapter(model, folder, adapter_name=name)
            self.classifiers[classes] = model
            labels = labels if len(labels) == classes else [f"LABEL_{i}" for i in range(classes)]
        else:
            load_adapter(self.model, folder, adapter_name=name)
        self.model.eval()
        adapter = Adapter(name, kind, str(path), labels)
        self.adapters[name] = adapter
        return adapter

    def load(self, name: str, path: str | os.PathLike) -> Adapter:
        """Load an adapter while serving."""
        return self.engine.call(lambda: self._load(name, path)).result()

    def unload(self, name: str, timeout: float = 60.0) -> None:
        """Stop serving adapter ``name``: new requests for it get 404 at once; its tensors go when no running
        request uses it. A classifier left without adapters goes whole; the language model left without
        adapters is the plain base model again."""
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise NotFound(f"no adapter named {name!r} is loaded")
        deadline = time.monotonic() + timeout
        while self.engine.in_use(name) and time.monotonic() < deadline:
            time.sleep(0.01)
        if adapter.kind == "generate":
            self.engine.call(lambda: _drop(self.model, name)).result()
            return

        def drop_classifier() -> None:
            for classes, model in list(self.classifiers.items()):
                if name in adapter_configs(model):
                    if len(adapter_configs(model)) == 1:
                        del self.classifiers[classes]  # its own copy of the base goes with it
                    else:
                        _drop(model, name)

        self.engine.call(drop_classifier).result()

    def _classifier_of(self, name: str) -> nn.Module | None:
        return next((m for m in self.classifiers.values() if name in adapter_configs(m)), None)

    def get(self, model: str, kind: str) -> str:
        """The engine's adapter name for the requested ``model`` (the base or an adapter of ``kind``)."""
        if model == self.name:
            if kind == "generate":
                return BASE
            raise ConfigError(f"model {model!r} is the base language model; /classify needs a classification "
                              "adapter (a classification run or a SEQ_CLS adapter folder)")
        adapter = self.adapters.get(model)
        if adapter is None:
            names = [self.name, *self.adapters]
            raise NotFound(f"model {model!r} does not exist; this server has {names}")
        if adapter.kind != kind:
            what = "a classification adapter: use POST /classify" if adapter.kind == "classify" else \
                "a generation adapter: use /v1/completions or /v1/chat/completions"
            raise ConfigError(f"model {model!r} is {what}")
        return model

    def classify(self, name: str, texts: list[list[int]]) -> list[list[float]]:
        """Class probabilities of each tokenised text under classification adapter ``name``."""
        model = self._classifier_of(name)
        if model is None:
            raise NotFound(f"no classification adapter named {name!r} is loaded")

        def run() -> list[list[float]]:
            width = max(len(t) for t in texts)
            ids = torch.zeros(len(texts), width, dtype=torch.long)
            mask = torch.zeros(len(texts), width, dtype=torch.long)
            for row, tokens in enumerate(texts):
                ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, :len(tokens)] = 1
            with torch.inference_mode():
                logits = model(ids.to(self.device), mask.to(self.device), adapter_names=[name] * len(texts))
            return logits.float().softmax(dim=-1).tolist()

        return self.engine.call(run).result()

    def listing(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries: the base, then every adapter with the base as its parent."""
        rows = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "gpt2lora",
                 "root": self.base_path, "parent": None}]
        for adapter in self.adapters.values():
            rows.append({"id": adapter.name, "object": "model", "created": adapter.created, "owned_by": "gpt2lora",
                         "root": adapter.path, "parent": self.name, "kind": adapter.kind})
        return rows

    def close(self, timeout: float = 30.0) -> None:
        self.engine.stop(timeout)


def _drop(model: nn.Module, name: str) -> None:
    configs = adapter_configs(model)
    if name not in configs:
        return
    if getattr(model, "active_adapter", None) == name:
        others = [n for n in configs if n != name]
        if not others:
            _drop_only_adapter(model, name)
            return
        set_adapter(model, others[0])
    delete_adapter(model, name)


def _drop_only_adapter(model: nn.Module, name: str) -> None:
    """Remove ``model``'s only adapter (``delete_adapter`` keeps an active one): every LoRA layer goes back to
    its plain layer, and the model has no adapter left (the registry stays, empty, for adapters loaded later)."""
    for path, module in list(lora_modules(model)):
        module.remove_slot(name)
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base_layer)
    registry = adapter_registry(model)
    if registry is not None:
        registry.remove_head(name)
        registry.configs.pop(name, None)
        registry.active = None
