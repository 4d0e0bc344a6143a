"""Constants and helper functions the tests share (fixtures live in conftest.py and are used as arguments)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from gpt2lora.ops.few_row import KernelChoice

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GPT2LORA_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
VOCAB = SHARED / "gpt2-tokenizer"
#: The training run tests start in a subprocess and kill on purpose (``python CRASH_WORKER cli --kill-... -- ARGS``).
CRASH_WORKER = REPO / "tests" / "crash_worker.py"

#: Small shapes used across the suite. "odd" has 3 heads of 32, a short context and eps 1e-6.
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 512}
ODD = {"n_layer": 3, "n_head": 3, "n_embd": 96, "n_positions": 40, "vocab_size": 300, "layer_norm_epsilon": 1e-6}
#: GPT2Config overrides that switch every model dropout off (exact comparisons between two passes).
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
#: Labels of the shared classifier checkpoint (the ``clf_checkpoint`` fixture).
CLF_LABELS = 3


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


# ---------------------------------------------------------------------------------------------- local hub


def point_hub_client_at(monkeypatch: pytest.MonkeyPatch, endpoint: str, home: Path) -> None:
    """Send the real huggingface_hub client (this process and its subprocesses) to ``endpoint``, with an
    empty ``HF_HOME`` and no token. The client reads these variables at import, so its constants are set too."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    values = {"ENDPOINT": endpoint, "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
              "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HUGGINGFACE_HUB_CACHE": str(home / "hub"),
              "HF_ASSETS_CACHE": str(home / "assets"), "HF_TOKEN_PATH": str(home / "token"),
              "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"), "HF_HUB_OFFLINE": False,
              "HF_HUB_DISABLE_XET": True, "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json")}
    for key, value in values.items():
        monkeypatch.setattr(constants, key, value)
    _http.close_session()  # pooled connections belong to the previous endpoint


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """``HF_HUB_OFFLINE=1`` for this process and its subprocesses."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def parquet_bytes(rows: list[dict]) -> bytes:
    """``rows`` as the bytes of one parquet file."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def card(configs: list[dict] | None = None, body: str = "# dataset\n") -> str:
    """A dataset card (README.md) whose YAML header holds ``configs``."""
    import yaml

    return ("---\n" + yaml.safe_dump({"configs": configs}, sort_keys=False) + "---\n" if configs else "") + body


def sst2_rows(split: str, n: int) -> list[dict]:
    """The first ``n`` SST-2 rows of ``split`` from ../shared, in the hub's columns (GLUE hides test labels)."""
    rows = read_jsonl(require_shared(DATA) / "sst2" / f"{split}.jsonl", limit=n)
    return [{"idx": i, "sentence": r["text"], "label": -1 if split == "test" else r["label"]}
            for i, r in enumerate(rows)]


def sst2_hub_files(rows: dict[str, int], shards: dict[str, int] | None = None) -> dict[str, bytes | str]:
    """stanfordnlp/sst2 as the hub holds it: a card with ``configs`` and ``data/{split}-0000K-of-0000N.parquet``."""
    files: dict[str, bytes | str] = {"README.md": card([{"config_name": "default", "data_files": [
        {"split": split, "path": f"data/{split}-*"} for split in rows]}])}
    for split, n in rows.items():
        data, count = sst2_rows(split, n), (shards or {}).get(split, 1)
        size = -(-len(data) // count)
        for k in range(count):
            files[f"data/{split}-{k:05d}-of-{count:05d}.parquet"] = parquet_bytes(data[k * size:(k + 1) * size])
    return files


def gpt2_stand_in(folder: Path, seed: int = 0, **shape) -> Path:
    """A tiny random GPT-2 with the real vocabulary and tokenizer files, to serve as the hub's ``gpt2``."""
    return make_hf_checkpoint(folder, seed=seed, with_tokenizer=True, **{
        "vocab_size": 50257, "n_embd": 32, "n_head": 2, "n_layer": 2, "n_positions": 128, **shape})


def tiny_lora_lm(dropout: float = 0.0) -> torch.nn.Module:
    """A TINY GPT-2 (model dropout ``dropout``) with rank-4 LoRA on the four block layers, no LoRA dropout,
    and B drawn non-zero (seeded) so that every factor gets a gradient from the first step."""
    from gpt2lora import GPT2, GPT2Config, LoRAConfig, apply_lora
    from gpt2lora.config import BLOCK_TARGETS

    model = GPT2(GPT2Config(**TINY, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=BLOCK_TARGETS), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05, generator=torch.Generator().manual_seed(1))
    return model


def ours(kind: str, checkpoint: Path) -> torch.nn.Module:
    """gpt2lora's model of a test checkpoint in eval mode: the LM (``kind="lm"``) or the classifier."""
    from gpt2lora import GPT2, GPT2ForSequenceClassification

    return (GPT2 if kind == "lm" else GPT2ForSequenceClassification).from_pretrained(checkpoint).eval()


def hf_twin(kind: str, checkpoint: Path) -> torch.nn.Module:
    """transformers' model of the same checkpoint in eval mode (the reference)."""
    import transformers

    cls = transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification
    return cls.from_pretrained(checkpoint).eval()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits of gpt2lora's or transformers' (and peft's) models alike, without gradients."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recording(KernelChoice):
    """Decides every key for one named candidate (default: the plain one) at its first call, and records which
    candidates each call was offered."""

    def __init__(self, name: str = "F.linear") -> None:
        super().__init__()
        self.name = name
        self.offered: list[tuple[str, ...]] = []

    def pick(self, key, candidates, warm_up=None):
        self.offered.append(tuple(candidates))
        self.chosen[key] = self.name
        return candidates[self.name]()
