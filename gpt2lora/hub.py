"""Find, read and write Hugging Face-layout GPT-2 checkpoints (config.json + safetensors)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import HUB_IDS, GPT2Config
from .errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsafeCheckpointError

ModelT = TypeVar("ModelT", bound=nn.Module)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
#: Files fetched from the hub for a model: nothing else is downloaded.
MODEL_FILES = ("config.json", WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*.safetensors", *TOKENIZER_FILES)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

#: Linear layers that GPT-2 checkpoints store as Conv1D, i.e. weight shaped (in, out).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
#: Causal-mask buffers some checkpoints carry; they are not weights.
MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")
BODY_PREFIXES = ("wte.", "wpe.", "h.", "ln_f.")


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None,
                       patterns: Iterable[str] = MODEL_FILES) -> Path:
    """A local folder holding the checkpoint: ``name_or_path`` itself, or the hub snapshot of that id.

    Short names (``gpt2``, ``gpt2-medium``, ...) map to their ``openai-community`` repositories.
    Only files matching ``patterns`` are downloaded.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"{path} is a file; expected a checkpoint folder with config.json")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", ""):
        raise CheckpointNotFoundError(f"checkpoint folder {path} does not exist")
    repo_id = HUB_IDS.get(name, name)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                   allow_patterns=list(patterns))
    except Exception as err:  # the hub raises many types; all mean "not available"
        raise CheckpointNotFoundError(
            f"{name!r} is neither a local folder nor a hub repository that could be downloaded "
            f"({type(err).__name__}: {err})") from err
    return Path(folder)


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found: a checkpoint folder needs config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (one file, or the shards its index names)."""
    single, index = folder / WEIGHTS_NAME, folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({err})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeCheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); gpt2lora loads safetensors only "
            f"because unpickling can run code. Convert them to {WEIGHTS_NAME} with a tool you trust.")
    raise CheckpointNotFoundError(f"{folder} has no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME})")


def read_safetensors(path: Path, device: str = "cpu") -> dict[str, Tensor]:
    """Every tensor of one safetensors file; a corrupt or truncated file is named in the error."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            names = list(f.keys())
            return {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder, under the names the file uses."""
    state: dict[str, Tensor] = {}
    for path in weight_files(folder):
        state.update(read_safetensors(path))
    return state


def from_hf_names(hf_state: Mapping[str, Tensor], source: str = "checkpoint") -> dict[str, Tensor]:
    """Map hub or ``save_pretrained`` names to gpt2lora's: ``transformer.``-prefixed, Linear layout."""
    state = {}
    origin: dict[str, str] = {}
    for key, tensor in hf_state.items():
        if key.endswith(MASK_BUFFER_SUFFIXES):
            continue
        name = "transformer." + key if key.startswith(BODY_PREFIXES) else key
        if name in origin:  # e.g. both "h.0.x" and "transformer.h.0.x": which one is meant is unknowable
            raise CheckpointError(f"{source}: tensors {origin[name]!r} and {key!r} are the same weight {name!r}; "
                                  "expected it once")
        origin[name] = key
        if name.endswith(CONV1D_SUFFIXES) and tensor.dim() == 2:
            tensor = tensor.t()
        state[name] = tensor
    return state


def to_hf_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`from_hf_names`: Conv1D layout, ``save_pretrained`` names."""
    return {key: (t.t() if key.endswith(CONV1D_SUFFIXES) else t).contiguous() for key, t in state.items()}


def check_state(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], source: str,
                optional: Iterable[str] = (), ignored: Iterable[str] = ()) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    optional, ignored = set(optional), set(ignored)
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected) - ignored)
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(set(found) & set(expected)) if found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))


def expected_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's tensors by name, without the LM head when it is (still) tied to ``wte``."""
    state = model.state_dict(keep_vars=True)
    config = getattr(model, "config", None)
    head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
    # a merged LoRA on the head unties it: then the head is a tensor of its own and is kept
    if config is not None and config.tie_word_embeddings and (head is None or head is wte):
        state.pop("lm_head.weight", None)
    return state


def load_pretrained(cls: type[ModelT], name_or_path: str | os.PathLike, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, **model_kwargs: Any) -> ModelT:
    """Build ``cls`` from a checkpoint without a random-init pass (meta device, then assign)."""
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir)
    raw = read_config(folder)
    try:
        config = GPT2Config.from_hf_config(raw, source=str(folder / "config.json"))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    found = from_hf_names(read_weights(folder), source=f"checkpoint {folder}")
    with torch.device("meta"):
        model = cls(config, **model_kwargs)
    expected = expected_state(model)
    new_modules = getattr(model, "new_module_prefixes", lambda names: ())(found)
    optional = [k for k in expected if k.startswith(tuple(new_modules))]
    ignored = ["lm_head.weight", "score.weight"] if config.tie_word_embeddings else ["score.weight"]
    ignored = [k for k in ignored if k not in expected]
    check_state(expected, found, source=f"checkpoint {folder}", optional=optional, ignored=ignored)
    state = {k: v for k, v in found.items() if k in expected}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if optional:
        model.init_new_modules(dtype=dtype)  # type: ignore[attr-defined]
    if device is not None:
        model.to(device)
    model.name_or_path = str(name_or_path)
    model.checkpoint_dir = folder
    return model


def exportable_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's weights as a plain checkpoint holds them: no LoRA tensors, tied head dropped."""
    lora_modules = [name for name, m in model.named_modules() if hasattr(m, "adapter_params")]
    unmerged = [name for name in lora_modules if not getattr(model.get_submodule(name), "merged", False)]
    if unmerged:
        raise CheckpointError(f"LoRA is not merged in {', '.join(unmerged[:3])}"
                              f"{' ...' if len(unmerged) > 3 else ''}: call merge_lora(model) before "
                              "save_pretrained, or save the adapter with save_adapter")
    if getattr(getattr(model, "transformer", None), "prompt", None) is not None:
        raise CheckpointError("the model has a soft prompt (method 'prompt'), which a plain GPT-2 checkpoint "
                              "cannot hold; save it with save_adapter instead")
    state = {}
    for key, tensor in expected_state(model).items():
        if ".lora_" in key or key.startswith("adapter_heads."):
            continue
        # LoRALinear keeps the base weight under "<name>.weight"; nothing else to rename.
        state[key] = tensor.detach()
    heads = getattr(model, "adapter_heads", None)
    active = getattr(model, "active_adapter", None)
    if heads is not None and active in heads:  # a named adapter is merged: export its own head as score
        for name, param in heads[active].named_parameters():
            state[f"score.{name}"] = param.detach()
    return state


def save_pretrained(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers`` loads with identical logits.

    Tokenizer files are copied along when the model was loaded from a folder that had them.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_names({k: v.to("cpu") for k, v in exportable_state(model).items()})
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    hf_config = model.hf_config()
    if "lm_head.weight" in tensors:  # untied (e.g. by merging a LoRA on the head): say so to transformers
        hf_config["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    source = getattr(model, "checkpoint_dir", None)
    for name in TOKENIZER_FILES:
        if source is not None and (Path(source) / name).is_file() and Path(source) != out:
            shutil.copyfile(Path(source) / name, out / name)
    return out
