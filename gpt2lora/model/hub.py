"""Find, read and write Hugging Face-layout GPT-2 checkpoints (config.json + safetensors)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import HUB_IDS, GPT2Config
from ..constants import MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE, TOKENIZER_FILES
from ..errors import CheckpointError, CheckpointNotFoundError, ConfigError, UnsafeCheckpointError
from .pages import empty_on_huge_pages
from .tensorcheck import (
    MODEL_DTYPES,
    SAFETENSORS_DTYPES,
    check_floating,
    check_model_dtype,
    dtype_name,
    nonfinite_report,
    raise_nonfinite,
)

ModelT = TypeVar("ModelT", bound=nn.Module)

#: Files fetched from the hub for a model: nothing else is downloaded.
MODEL_FILES = (MODEL_CONFIG_FILE, MODEL_WEIGHTS_FILE, MODEL_WEIGHTS_INDEX_FILE, "model-*.safetensors", *TOKENIZER_FILES)
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
    patterns = list(patterns)
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns)
    except Exception as err:  # the hub raises many types; all mean "not available"
        raise CheckpointNotFoundError(
            f"{name!r} is not a local folder, and {', '.join(patterns)} of the hub model {repo_id} (revision "
            f"{revision or 'main'}) could not be downloaded: {hub_error_reason(err)}") from err
    return Path(folder)


def _error_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    pending: list[BaseException] = [err]
    while pending:
        current = pending.pop(0)
        if any(current is seen for seen in chain):
            continue
        chain.append(current)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return chain


def _what_url_fetches(url: str) -> str:
    """``file F`` for a hub ``/resolve/REV/F`` URL, ``the file list`` for repo info / tree listings."""
    path = urlsplit(url).path
    if "/resolve/" in path:
        return "file " + unquote(path.split("/resolve/", 1)[1].split("/", 1)[-1])
    if re.fullmatch(r"/api/\w+s/[^/]+/[^/]+(/revision/.+|/tree/.+)?", path):
        return "the file list"
    return "the hub API"


def hub_error_reason(err: BaseException) -> str:
    """One line saying why a ``huggingface_hub`` call failed: the HTTP status and URL (hence the file), a
    connection that could not be made, or offline mode with nothing in the cache."""
    from huggingface_hub import constants

    chain = _error_chain(err)
    for e in chain:
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            try:
                method, url = response.request.method, str(response.request.url)
            except (AttributeError, RuntimeError):
                method, url = "GET", str(getattr(response, "url", ""))
            code = response.headers.get("X-Error-Code")
            return f"{_what_url_fetches(url)}: HTTP {status}{f' {code}' if code else ''} ({method} {url})"
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if "OfflineModeIsEnabled" in names or constants.HF_HUB_OFFLINE:
        return f"HF_HUB_OFFLINE is set and it is not in the cache ({constants.HF_HUB_CACHE})"
    for e in chain:
        if type(e).__name__ in ("ConnectError", "ConnectTimeout", "ConnectionError", "ReadTimeout"):
            try:
                what = _what_url_fetches(str(e.request.url)) + ": "  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):
                what = ""
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return f"{what}cannot connect to {constants.ENDPOINT} ({detail}), and it is not in the cache"
    detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {detail}"


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder."""
    path = folder / MODEL_CONFIG_FILE
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
    single, index = folder / MODEL_WEIGHTS_FILE, folder / MODEL_WEIGHTS_INDEX_FILE
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
            f"because unpickling can run code. Convert them to {MODEL_WEIGHTS_FILE} with a tool you trust.")
    raise CheckpointNotFoundError(f"{folder} has no {MODEL_WEIGHTS_FILE} (or {MODEL_WEIGHTS_INDEX_FILE})")


def read_safetensors(path: Path, device: str = "cpu", keys: Iterable[str] | None = None) -> dict[str, Tensor]:
    """Every tensor of one safetensors file (or those ``keys`` name); a corrupt or truncated file is named in the
    error. Each call maps the file anew: the mapping goes with the last tensor read through it."""
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            names = list(f.keys()) if keys is None else list(keys)
            return {key: f.get_tensor(key) for key in names}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


LOAD_GROUP_BYTES = 64 << 20
"""At most this many bytes of a file are mapped at once while loading (a larger tensor is read alone). Mapping
GPT-2 124M's 148 tensors one by one made its load 10-16% slower than these groups on a 2-core Zen 3 EPYC (about
2 ms a mapping), while mapping a whole file at once keeps it resident beside the copies."""


def read_groups(header: Mapping[str, TensorInfo], limit: int | None = None) -> list[tuple[Path, list[str]]]:
    """The weights ``header`` names as (file, names) groups read through one mapping each: one file's tensors in
    their header order, up to ``limit`` bytes a group (default :data:`LOAD_GROUP_BYTES`; a larger tensor alone)."""
    limit = LOAD_GROUP_BYTES if limit is None else limit
    groups: list[tuple[Path, list[str]]] = []
    size = 0
    for key, info in header.items():
        if not _is_weight(key):
            continue
        known = SAFETENSORS_DTYPES.get(info.dtype)
        nbytes = (known.itemsize if known is not None else 1) * math.prod(info.shape)
        if not groups or groups[-1][0] != info.file or size + nbytes > limit:
            groups.append((info.file, []))
            size = 0
        groups[-1][1].append(key)
        size += nbytes
    return groups


def read_owned(header: Mapping[str, TensorInfo], expected: Mapping[str, Tensor], dtype: torch.dtype,
               allow_nonfinite: bool = False, huge_pages: bool = False) -> dict[str, Tensor]:
    """The tensors of a checkpoint that ``expected`` names (gpt2lora's names and layout), each an
    :func:`owned_copy` in ``dtype``; every weight in the files is checked finite first (unless
    ``allow_nonfinite``), the error naming each file's non-finite tensors.

    Tensors are read a group at a time (:func:`read_groups`), each dropped once copied, so loading holds the
    copies and at most one group of file tensors (a whole file mapped beside the copies would double the resident
    memory while loading).
    """
    state: dict[str, Tensor] = {}
    reports: dict[Path, list[str]] = {}
    for file, names in read_groups(header):
        group = read_safetensors(file, keys=names)  # its own mapping: unmapped once the group is copied
        for key in names:
            one = {key: group.pop(key)}
            if not allow_nonfinite:
                reports.setdefault(file, []).extend(nonfinite_report(one))
            for name, value in from_hf_names(one).items():  # renamed, a Conv1D matrix transposed
                if name in expected:
                    state[name] = owned_copy(value, dtype, huge_pages)
    raise_nonfinite(reports.items())
    return state


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder, under the names the file uses."""
    state: dict[str, Tensor] = {}
    for path in weight_files(folder):
        state.update(read_safetensors(path))
    return state


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor: no data is read."""

    shape: tuple[int, ...]
    dtype: str
    """safetensors' code, e.g. ``F32``, ``BF16``, ``I32``."""
    file: Path


def read_header(paths: Iterable[Path]) -> dict[str, TensorInfo]:
    """Name, shape and dtype of every tensor in the given safetensors files, from their JSON headers."""
    header: dict[str, TensorInfo] = {}
    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as f:
                names = f.keys()
                for key in names:
                    part = f.get_slice(key)
                    if key in header:
                        raise CheckpointError(f"tensor {key!r} is stored twice: in {header[key].file} and in {path}")
                    header[key] = TensorInfo(tuple(part.get_shape()), part.get_dtype(), path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None
    return header


def _is_weight(key: str) -> bool:
    return not key.endswith(MASK_BUFFER_SUFFIXES)


def check_config_fits(config: GPT2Config, header: Mapping[str, TensorInfo], config_path: Path) -> None:
    """Fail at once, naming each field, when ``config.json`` describes another shape than the weights hold.

    Runs on the header alone, before any module is built. A field is refused only when no tensor that
    carries its size agrees with it; a single odd tensor is left to the full check (which lists it).
    """
    names = {("transformer." + key if key.startswith(BODY_PREFIXES) else key): key
             for key in header if _is_weight(key)}
    blocks = sorted({int(m.group(1)) for name in names if (m := re.match(r"transformer\.h\.(\d+)\.", name))})
    problems = []
    if config.n_layer > len(blocks):
        held = f"transformer.h.{blocks[0]} .. transformer.h.{blocks[-1]}" if blocks else "none"
        files = sorted({t.file.name for t in header.values()})
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        problems.append(f"n_layer={config.n_layer} but the weights ({shown}) hold {len(blocks)} block"
                        f"{'' if len(blocks) == 1 else 's'} ({held})")
    # field -> (value, [(gpt2lora name, axis of the stored (Conv1D) shape)])
    inner = [(f"transformer.h.{i}.mlp.c_fc.weight", 1) for i in blocks] + \
        [(f"transformer.h.{i}.mlp.c_fc.bias", 0) for i in blocks]
    fields = {
        "vocab_size": (config.vocab_size, [("transformer.wte.weight", 0), ("lm_head.weight", 0)]),
        "n_embd": (config.n_embd, [("transformer.wte.weight", 1), ("transformer.wpe.weight", 1),
                                   ("transformer.ln_f.weight", 0)]),
        "n_positions": (config.n_positions, [("transformer.wpe.weight", 0)]),
        "n_inner": (config.inner_dim, inner),
    }
    for field, (value, sources) in fields.items():
        seen = [(header[names[n]].shape[axis], names[n]) for n, axis in sources
                if n in names and len(header[names[n]].shape) > axis]
        if seen and all(size != value for size, _ in seen):
            size, key = seen[0]
            info = header[key]
            shown = f"n_inner={config.n_inner} (4 * n_embd = {value})" if field == "n_inner" and \
                config.n_inner is None else f"{field}={value}"
            problems.append(f"{shown} but the weights say {size} ({info.file.name}: {key} has shape "
                            f"{info.shape})")
    if problems:
        raise CheckpointError(f"{config_path} does not describe the weights beside it: " + "; ".join(problems))


def weights_dtype(header: Mapping[str, TensorInfo], dtype: torch.dtype | None, folder: Path,
                  config_dtype: Any = None) -> torch.dtype:
    """The dtype the model gets, as transformers' ``dtype="auto"`` picks it: ``dtype`` if given, else the
    ``dtype`` / ``torch_dtype`` of ``config.json`` when it names one, else the checkpoint's own float dtype
    (for a mix, their lossless common dtype). Integer, bool or complex tensors are refused by name.
    """
    weights = {k: t for k, t in header.items() if _is_weight(k)}
    for path in dict.fromkeys(t.file for t in weights.values()):
        check_floating({k: t.dtype for k, t in weights.items() if t.file == path}, path)
    if dtype is not None:
        return dtype
    named = getattr(torch, config_dtype, None) if isinstance(config_dtype, str) else None
    if named in MODEL_DTYPES:
        return named
    counts = Counter(t.dtype for t in weights.values())
    if not counts:
        return torch.get_default_dtype()
    common = SAFETENSORS_DTYPES[counts.most_common(1)[0][0]]
    try:
        for code in counts:
            common = torch.promote_types(common, SAFETENSORS_DTYPES[code])
    except RuntimeError:  # e.g. float8 next to float16: torch defines no common type
        common = None
    if common in MODEL_DTYPES:
        return common
    usual = counts.most_common(1)[0][0]
    odd = [f"{k} is {dtype_name(t.dtype)}" for k, t in weights.items() if t.dtype != usual][:5]
    what = (f"tensor {', tensor '.join(odd)}, the others {dtype_name(usual)}" if odd
            else f"every tensor is {dtype_name(usual)}")
    raise CheckpointError(f"checkpoint {folder}: {what}, which a model cannot hold as they are; pass "
                          "dtype=torch.float32 (or float16 / bfloat16) to convert them all")


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


def owned_copy(tensor: Tensor, dtype: torch.dtype, huge_pages: bool = False) -> Tensor:
    """``tensor`` in ``dtype``, contiguous, in memory of its own (never a view of a safetensors file's mapping).

    A Conv1D matrix arrives as a transposed view; copied to the (out, in) layout a model built from a config has,
    one-row products (decoding) read it about 1.2x faster on a Zen 4 EPYC, and training products are no slower.
    Every other tensor is copied too: while any tensor views the mapping, the whole file stays mapped (and in
    the process's resident memory) beside the copies. Costs about 0.1-0.25 s for GPT-2 124M.
    ``huge_pages``: the copy is written on 2 MB pages where the system allows it
    (:func:`gpt2lora.model.pages.empty_on_huge_pages`).
    """
    out = empty_on_huge_pages(tensor.shape, dtype) if huge_pages else torch.empty(tensor.shape, dtype=dtype)
    return out.copy_(tensor)


@torch.inference_mode(False)  # loaded inside inference_mode, weights would be inference tensors: never trainable
def load_pretrained(cls: type[ModelT], name_or_path: str | os.PathLike, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, allow_nonfinite: bool = False,
                    huge_pages: bool = False, **model_kwargs: Any) -> ModelT:
    """Build ``cls`` from a checkpoint without a random-init pass (meta device, then assign).

    The safetensors headers are checked against ``config.json`` (sizes, block count, dtypes) and the
    model's tensor names and shapes before any data is read; then every weight must be finite
    (``allow_nonfinite=True`` skips that). ``dtype`` converts the weights; without it the model gets the
    dtype ``config.json`` names, else the checkpoint's own (see :func:`weights_dtype`). The weights are ordinary
    tensors even when loaded inside ``torch.inference_mode()``: trainable later, and packed for faster decoding
    (:mod:`gpt2lora.ops.packed`, which never keeps a pack on an inference tensor).
    """
    check_model_dtype(dtype, f"{cls.__name__}.from_pretrained")
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir)
    raw = read_config(folder)
    try:
        config = GPT2Config.from_hf_config(raw, source=str(folder / MODEL_CONFIG_FILE))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    files = weight_files(folder)
    header = read_header(files)
    check_config_fits(config, header, folder / MODEL_CONFIG_FILE)
    target = weights_dtype(header, dtype, folder, raw.get("dtype", raw.get("torch_dtype")))
    layout = from_hf_names({k: torch.empty(t.shape, device="meta") for k, t in header.items()},
                           source=f"checkpoint {folder}")
    with torch.device("meta"):
        model = cls(config, **model_kwargs)
    expected = expected_state(model)
    new_modules = getattr(model, "new_module_prefixes", lambda names: ())(layout)
    optional = [k for k in expected if k.startswith(tuple(new_modules))]
    ignored = ["lm_head.weight", "score.weight"] if config.tie_word_embeddings else ["score.weight"]
    ignored = [k for k in ignored if k not in expected]
    check_state(expected, layout, source=f"checkpoint {folder}", optional=optional, ignored=ignored)
    on_cpu = device is None or torch.device(device).type == "cpu"  # pages of copies moved off the CPU would not last
    state = read_owned(header, expected, target, allow_nonfinite, huge_pages and on_cpu)
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if optional:
        model.init_new_modules(dtype=target)  # type: ignore[attr-defined]
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
    # Matrices bf16 training held in bf16 (gpt2lora.training.precision) are written in the checkpoint's dtype.
    held = {m.weight.data_ptr(): m.weight_held_from for m in model.modules()
            if getattr(m, "weight_held_from", None) is not None}
    state = {}
    for key, tensor in expected_state(model).items():
        if ".lora_" in key or key.startswith("adapter_heads."):
            continue
        # LoRALinear keeps the base weight under "<name>.weight"; nothing else to rename.
        state[key] = tensor.detach().to(held.get(tensor.data_ptr(), tensor.dtype))
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
    save_file(tensors, str(out / MODEL_WEIGHTS_FILE), metadata={"format": "pt"})
    hf_config = model.hf_config()
    if "lm_head.weight" in tensors:  # untied (e.g. by merging a LoRA on the head): say so to transformers
        hf_config["tie_word_embeddings"] = False
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    source = getattr(model, "checkpoint_dir", None)
    for name in TOKENIZER_FILES:
        if source is not None and (Path(source) / name).is_file() and Path(source) != out:
            shutil.copyfile(Path(source) / name, out / name)
    return out
