"""GGUF files for llama.cpp and Ollama (the ``gguf`` extra): a merged GPT-2 with its tokenizer, or a LoRA adapter.

The merged file uses llama.cpp's ``gpt2`` architecture: the tensor names of ``gguf.MODEL_ARCH.GPT2``
(``token_embd``, ``position_embd``, ``blk.N.attn_qkv`` ...) and the hyperparameter keys ``gpt2.*``, with the
BPE vocabulary and merges under ``tokenizer.ggml.*`` and the pre-tokenizer named ``gpt-2`` (llama.cpp
refuses a GPT-2 tokenizer without a pre-tokenizer it knows). gpt2lora keeps its block weights in Linear
orientation (out, in), which is what GGUF stores, so no weight is transposed; transformers' Conv1D
(in, out) weights are what llama.cpp's converter transposes.

The adapter file holds ``blk.N.<tensor>.weight.lora_a`` (rank, in) and ``.lora_b`` (out, rank) as peft
keeps them — llama.cpp checks ``a.ne[0] == W.ne[0]`` (in) and ``b.ne[1] == W.ne[1]`` (out) — and
``adapter.lora.alpha`` chosen so that llama.cpp's ``alpha / rank`` is gpt2lora's scaling (rsLoRA and the
from-scratch style included). q/k/v-slice adapters become one pair over ``attn_qkv``; a PiSSA/OLoRA adapter
is written converted for the unmodified base, as its peft file is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..constants import RUN_CONFIG_FILE, TOKENIZER_FILES
from ..errors import ConfigError
from ..model.gpt2 import GPT2
from ..model.hub import exportable_state, resolve_checkpoint
from ..model.tokenizer import ENDOFTEXT
from ..peft.lora import lora_modules

DTYPES = ("f32", "f16", "q8_0")
"""Weight types of the merged file: 2-D weights in this type; norms, biases and positions always f32."""

# gpt2lora's module names -> llama.cpp's GPT-2 tensor names
BLOCK_TENSORS = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
                 "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_TENSORS = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
               "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
               "lm_head.weight": "output.weight"}
# llama.cpp's GPT-2 graph uses ggml_gelu, the tanh approximation
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'gpt2lora[gguf]'") from None
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's name of a gpt2lora tensor (``transformer.h.3.mlp.c_fc.weight`` -> ``blk.3.ffn_up.weight``)."""
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["transformer", "h"]:
        module, leaf = ".".join(parts[3:-1]), parts[-1]
        if module in BLOCK_TENSORS:
            return f"blk.{parts[2]}.{BLOCK_TENSORS[module]}.{leaf}"
    raise ConfigError(f"{name}: no tensor of llama.cpp's GPT-2 layout holds it")


def _check_model(model: nn.Module) -> GPT2:
    if not isinstance(model, GPT2):
        raise ConfigError(f"GGUF export: expected a GPT-2 language model, got {type(model).__name__} (a "
                          "classification head has no place in llama.cpp's GPT-2)")
    if model.transformer.prompt is not None:
        raise ConfigError("GGUF export: the model has a soft prompt (method 'prompt'), which llama.cpp's GPT-2 "
                          "cannot hold")
    act = model.config.activation_function
    if act not in ACTIVATIONS:
        raise ConfigError(f"GGUF export: activation_function {act!r}; llama.cpp's GPT-2 computes "
                          f"{' / '.join(ACTIVATIONS)} only")
    return model


def _tokenizer(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], int]:
    """Tokens (byte-level strings, by id), their types, the merges and the id of ``<|endoftext|>``."""
    vocab_path, merges_path = (folder / name for name in TOKENIZER_FILES)
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise ConfigError(f"GGUF export: {path} is missing; the tokenizer files ({', '.join(TOKENIZER_FILES)}) "
                              "go into the file")
    vocab: dict[str, int] = json.loads(vocab_path.read_text(encoding="utf-8"))
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{vocab_path}: token ids are not 0..{len(vocab) - 1} without gaps")
    if len(vocab) != vocab_size:
        raise ConfigError(f"{vocab_path}: {len(vocab)} tokens, but the model's vocab_size is {vocab_size}; "
                          "llama.cpp needs one token per embedding row")
    tokens = sorted(vocab, key=vocab.__getitem__)
    if ENDOFTEXT not in vocab:
        raise ConfigError(f"{vocab_path}: no {ENDOFTEXT} token")
    eot = vocab[ENDOFTEXT]
    types = [3 if t == ENDOFTEXT else 1 for t in tokens]  # gguf.TokenType.CONTROL / NORMAL
    merges = [line for line in merges_path.read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    return tokens, types, merges, eot


def _weights(gguf: Any, name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Any]:
    """``array`` in the file's type: 1-D tensors and the position table stay f32, as llama.cpp's converter
    keeps them (its CPU kernels read positions as f32: a q8_0 table crashes the GPT-2 graph)."""
    types = gguf.GGMLQuantizationType
    if array.ndim == 1 or dtype == "f32" or name.startswith("position_embd."):
        return array.astype(np.float32), types.F32
    if dtype == "f16" or array.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0]:
        return array.astype(np.float16), types.F16
    return gguf.quants.quantize(array.astype(np.float32), types.Q8_0), types.Q8_0


def write_gguf(model: nn.Module, out: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
               dtype: str = "f32", name: str | None = None) -> Path:
    """Write a (merged) GPT-2 and its tokenizer as a GGUF file llama.cpp loads.

    ``tokenizer_dir``: folder with ``vocab.json`` and ``merges.txt`` (default: the checkpoint's own folder).
    LoRA must be merged first (:func:`gpt2lora.merge_lora`); ``dtype``: ``f32``, ``f16`` or ``q8_0``.
    """
    gguf = _gguf()
    model = _check_model(model)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    folder = tokenizer_dir or model.checkpoint_dir
    if folder is None:
        raise ConfigError("GGUF export: the model was not loaded from a folder; pass tokenizer_dir= (a folder "
                          "with vocab.json and merges.txt)")
    unmerged = [n for n, m in lora_modules(model) if not m.merged]
    if unmerged:
        raise ConfigError(f"GGUF export: LoRA is not merged in {unmerged[0]}; call merge_lora(model) first, or "
                          "export the adapter with write_gguf_adapter")
    state = exportable_state(model)
    config = model.config
    tokens, types, merges, eot = _tokenizer(Path(folder), config.vocab_size)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_name(name or Path(str(model.name_or_path or path.stem)).name)
    writer.add_block_count(config.n_layer)
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(eot)
    writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)  # GPT-2 prompts start without a BOS token
    for key, tensor in state.items():
        target = gguf_name(key)
        data, kind = _weights(gguf, target, tensor.detach().to("cpu", torch.float32).numpy(), dtype)
        writer.add_tensor(target, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def adapter_tensors(model: nn.Module, adapter: str | None = None) -> tuple[float, dict[str, np.ndarray]]:
    """``(alpha for llama.cpp, {gguf name: array})`` of one LoRA adapter of ``model``."""
    layers = list(lora_modules(model))
    if not layers:
        raise ConfigError("GGUF adapter export: the model has no LoRA adapter")
    names = sorted({n for _, m in layers for n in m.slots})
    if adapter is None:
        if len(names) > 1:
            raise ConfigError(f"GGUF adapter export: the model holds several adapters {names} (mixed-adapter "
                              "state); name the one to export")
        adapter = names[0]
    out: dict[str, np.ndarray] = {}
    scalings = set()
    for layer, module in layers:
        slot = module.slots.get(adapter)
        if slot is None:
            continue
        if module.merged:
            raise ConfigError(f"GGUF adapter export: {layer} is merged; an adapter file needs it unmerged")
        if slot.use_dora:
            raise ConfigError(f"GGUF adapter export: {layer} is DoRA, whose magnitudes llama.cpp's LoRA "
                              "adapters cannot hold; export the merged model instead (without --adapter-only)")
        base = gguf_name(f"{layer}.weight")
        a_parts, b_parts = [], []
        if slot.config.train_bias != "none":
            raise ConfigError(f"GGUF adapter export: adapter {adapter!r} trains biases (train_bias="
                              f"{slot.config.train_bias!r}), which llama.cpp's LoRA adapters cannot hold; export "
                              "the merged model instead")
        initial = slot.initial()
        for i, (start, end, a, b) in enumerate(slot.pieces()):
            a, b = a.detach(), b.detach()
            if initial:  # a residual init (PiSSA/OLoRA): ΔW = s·B·A − s·B0·A0, one pair of twice the rank
                a0, b0 = initial[i]
                a = torch.cat([a, a0.to(a.device, a.dtype)], dim=0)
                b = torch.cat([b, -b0.to(b.device, b.dtype)], dim=1)
            full = b.new_zeros(module.out_features, b.size(1))
            full[start:end] = b
            a_parts.append(a)
            b_parts.append(full)
        out[f"{base}.lora_a"] = torch.cat(a_parts, dim=0).to("cpu", torch.float32).numpy()
        out[f"{base}.lora_b"] = torch.cat(b_parts, dim=1).to("cpu", torch.float32).numpy()
        scalings.add((slot.scaling, out[f"{base}.lora_a"].shape[0]))
    if not out:
        raise ConfigError(f"GGUF adapter export: no layer carries adapter {adapter!r}")
    scaling = {s for s, _ in scalings}
    if len(scaling) > 1:
        raise ConfigError(f"GGUF adapter export: adapter {adapter!r} scales its layers differently {sorted(scaling)}; "
                          "llama.cpp applies one alpha per file")
    ranks = {r for _, r in scalings}
    if len(ranks) > 1:  # alpha/rank must come out the same everywhere: pad every pair to the largest rank
        top = max(ranks)
        for key in [k for k in out if k.endswith(".lora_a")]:
            a, b = out[key], out[key[:-1] + "b"]
            out[key] = np.concatenate([a, np.zeros((top - a.shape[0], a.shape[1]), np.float32)])
            out[key[:-1] + "b"] = np.concatenate([b, np.zeros((b.shape[0], top - b.shape[1]), np.float32)], axis=1)
        ranks = {top}
    return scaling.pop() * ranks.pop(), out


def write_gguf_adapter(model: nn.Module, out: str | os.PathLike, adapter: str | None = None,
                       name: str | None = None) -> Path:
    """Write one LoRA adapter of ``model`` as a llama.cpp LoRA adapter GGUF (apply it on the base GGUF)."""
    gguf = _gguf()
    _check_model(model)
    alpha, tensors = adapter_tensors(model, adapter)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(name or path.stem)
    for key, array in tensors.items():
        writer.add_tensor(key, array, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_command(source: str | os.PathLike, fmt: str = "gguf", dtype: str = "f32",
                   out: str | os.PathLike | None = None, adapter_only: bool = False) -> Path:
    """``gpt2lora export``: a run folder (merged, or its adapter) or a checkpoint (hub id or folder) as GGUF."""
    from ..peft.lora import merge_lora
    from .run import load_run_model

    if fmt != "gguf":
        raise ConfigError(f"--format {fmt}: only gguf is supported")
    if adapter_only and dtype != "f32":
        raise ConfigError(f"--dtype {dtype}: adapter files are written f32 (their tensors are small); drop --dtype "
                          "or --adapter-only")
    src = Path(source)
    is_run = (src / RUN_CONFIG_FILE).is_file() and "method" in json.loads((src / RUN_CONFIG_FILE).read_text())
    if is_run:
        model, saved = load_run_model(src)
        tokenizer_dir = resolve_checkpoint(saved["base_model"], revision=saved.get("model_revision"),
                                           patterns=TOKENIZER_FILES)
        label = src.name
    else:
        if adapter_only:
            raise ConfigError(f"--adapter-only: {source} is a checkpoint, not a run folder with an adapter")
        model = GPT2.from_pretrained(source)
        tokenizer_dir, label = model.checkpoint_dir, Path(str(source)).name
    model.eval()
    if adapter_only:
        target = Path(out) if out else src / f"{label}-lora.gguf"
        path = write_gguf_adapter(model, target, name=label)
    else:
        if any(True for _ in lora_modules(model)):
            merge_lora(model)
        target = Path(out) if out else (src if is_run else Path(".")) / f"{label}-{dtype}.gguf"
        path = write_gguf(model, target, tokenizer_dir=tokenizer_dir, dtype=dtype, name=label)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return path
