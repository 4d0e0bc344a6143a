"""Shared fixtures: tiny random checkpoints saved by transformers, and the ../shared data and vocabulary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2LORA_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
VOCAB = SHARED / "gpt2-tokenizer"

# Tiny test models are dominated by per-op overhead, which extra threads only add to (and several test
# processes on a small machine oversubscribe the cores). Subprocesses started by tests inherit the variable.
TEST_THREADS = int(os.environ.get("GPT2LORA_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
torch.set_num_threads(TEST_THREADS)

#: Small shapes used across the suite. "odd" has 3 heads of 32, a short context and eps 1e-6.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 512}
ODD = {"n_layer": 3, "n_head": 3, "n_embd": 96, "n_positions": 40, "vocab_size": 300, "layer_norm_epsilon": 1e-6}


def require_shared(path: Path) -> Path:
    """Skip (with the reason) when ../shared is absent; CI always has it."""
    if not path.exists():
        pytest.skip(f"{path} not found: tests that read real data need ../shared beside the repository "
                    "(or GPT2LORA_SHARED pointing at it)")
    return path


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def left_padded(lengths: list[int], vocab: int, pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with ``pad``, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(0, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def make_hf_checkpoint(folder: Path, seed: int = 0, cls: str = "GPT2LMHeadModel", num_labels: int = 2,
                       with_tokenizer: bool = False, **shape) -> Path:
    """Save a randomly initialised transformers GPT-2 in the hub layout (config.json + model.safetensors)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{**TINY, **shape}, num_labels=num_labels, pad_token_id=0,
                                     bos_token_id=0, eos_token_id=0)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial so parity tests can fail
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder)
    if with_tokenizer:
        for name in ("vocab.json", "merges.txt"):
            (folder / name).write_bytes((require_shared(VOCAB) / name).read_bytes())
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT2LMHeadModel checkpoint as transformers' save_pretrained writes it."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def odd_checkpoint(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("odd") / "ckpt", seed=1, **ODD)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared(DATA)


@pytest.fixture(scope="session")
def gpt2_vocab() -> Path:
    return require_shared(VOCAB)
