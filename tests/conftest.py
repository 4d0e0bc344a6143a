"""Shared fixtures: tiny random checkpoints saved by transformers, the ../shared data and vocabulary, a local hub.

Tests take them as arguments; the constants and helper functions they share are in ``tests/helpers.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import (
    CLF_LABELS,
    DATA,
    NO_DROPOUT,
    ODD,
    VOCAB,
    make_hf_checkpoint,
    point_hub_client_at,
    require_shared,
)

from gpt2lora.ops import packed

# Tiny test models are dominated by per-op overhead, which extra threads only add to (and several test
# processes on a small machine oversubscribe the cores). Subprocesses started by tests inherit the variable.
TEST_THREADS = int(os.environ.get("GPT2LORA_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session", autouse=True)
def kernel_choices_of_this_session(tmp_path_factory):
    """The kernel choices stored by this session's processes (subprocesses inherit the variable) go to a file of
    its own: each test run measures afresh, and the user's cache is left alone."""
    from gpt2lora.ops.stored_choices import ENVIRONMENT

    before = os.environ.get(ENVIRONMENT)
    os.environ[ENVIRONMENT] = str(tmp_path_factory.mktemp("kernel-choices") / "choices.json")
    yield
    if before is None:
        del os.environ[ENVIRONMENT]
    else:
        os.environ[ENVIRONMENT] = before


CPU_EMULATES_HALF_PRODUCTS = packed.half_products_emulated
"""The real :func:`gpt2lora.ops.packed.half_products_emulated`, which the fixture below replaces in every test
(:func:`the_real_cpus_half_products` puts it back)."""


@pytest.fixture(autouse=True)
def half_products_as_on_a_cpu_with_bf16_units(monkeypatch):
    """In-process tests see a CPU that computes bf16 products itself, whatever CPU runs them, so that a bf16
    model's products take the same kernels on every machine; tests/ops/test_fp16_route.py sets it the other way
    for CPUs that emulate them, and :func:`the_real_cpus_half_products` back to the machine's own answer where a
    test compares with a subprocess (which sees the real CPU)."""
    monkeypatch.setattr(packed, "half_products_emulated", lambda: False)


@pytest.fixture
def the_real_cpus_half_products(monkeypatch):
    monkeypatch.setattr(packed, "half_products_emulated", CPU_EMULATES_HALF_PRODUCTS)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices train faster on one thread; on a loaded 2-core machine, far faster (no spin-waits).

    Modules that train many tiny models use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT2LMHeadModel checkpoint as transformers' save_pretrained writes it."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def odd_checkpoint(tmp_path_factory) -> Path:
    return make_hf_checkpoint(tmp_path_factory.mktemp("odd") / "ckpt", seed=1, **ODD)


@pytest.fixture(scope="session")
def no_dropout_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT2LMHeadModel checkpoint whose config switches every dropout off (exact two-pass comparisons)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("no-dropout") / "ckpt", seed=3, **NO_DROPOUT)


@pytest.fixture(scope="session")
def clf_checkpoint(tmp_path_factory) -> Path:
    """A tiny GPT2ForSequenceClassification checkpoint (``CLF_LABELS`` classes) as transformers writes it."""
    # seed 5: the DoRA training-trajectory test (tests/peft/test_dora.py, atol 1e-5 after four AdamW steps) was
    # written against it; on another seed one element of 1024 drifted 1e-4, which Adam's normalisation amplifies.
    return make_hf_checkpoint(tmp_path_factory.mktemp("clf") / "ckpt", seed=5, cls="GPT2ForSequenceClassification",
                              num_labels=CLF_LABELS)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared(DATA)


@pytest.fixture(scope="session")
def gpt2_vocab() -> Path:
    return require_shared(VOCAB)


@pytest.fixture(scope="session")
def tok(gpt2_vocab):
    """gpt2lora's tokenizer of the real GPT-2 vocabulary."""
    from gpt2lora import load_tokenizer

    return load_tokenizer(gpt2_vocab)


@pytest.fixture(scope="session")
def hf_tokenizer(gpt2_vocab):
    """The reference byte-level BPE (Hugging Face ``tokenizers``) over the same vocabulary."""
    import tokenizers

    return tokenizers.ByteLevelBPETokenizer(str(gpt2_vocab / "vocab.json"), str(gpt2_vocab / "merges.txt"),
                                            add_prefix_space=False)


# ---------------------------------------------------------------------------------------------- local hub


class _NoSleep:
    """Stands in for the ``time`` module inside huggingface_hub's retry loop: retries happen, waits do not."""

    def __init__(self) -> None:
        import time

        self._time = time
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def __getattr__(self, name: str):
        return getattr(self._time, name)


@pytest.fixture(scope="session")
def _local_hub_server():
    from hub_server import LocalHub

    server = LocalHub().start()
    yield server
    server.stop()


@pytest.fixture
def hub(_local_hub_server, tmp_path, monkeypatch):
    """A local hub server (tests/hub_server.py) that the real huggingface_hub client talks to, with a
    temporary ``HF_HOME``. ``hub.put(repo_id, files)`` publishes files; ``hub.fail(...)`` injects errors."""
    from huggingface_hub.utils import _http

    _local_hub_server.reset()
    point_hub_client_at(monkeypatch, _local_hub_server.url, tmp_path / "hf-home")
    no_sleep = _NoSleep()
    monkeypatch.setattr(_http, "time", no_sleep)
    _local_hub_server.sleeps = no_sleep.sleeps
    yield _local_hub_server
    _http.close_session()
    assert not _local_hub_server.unhandled, f"the client called endpoints the local hub lacks: " \
                                            f"{_local_hub_server.unhandled}"
