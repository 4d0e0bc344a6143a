"""No code execution: pickles planted in checkpoint, adapter and training-checkpoint folders never run.

Each planted file is a real pickle whose unpickling writes a marker file (proved first in the test), put
next to the safetensors weights (loading must ignore it) or instead of them (loading must refuse).
"""

from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CLF_LABELS, REPO

import gpt2lora
from gpt2lora import UnsafeCheckpointError
from gpt2lora.config import LoRAConfig, TrainConfig
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.model.gpt2 import GPT2
from gpt2lora.peft.files import load_adapter, save_adapter
from gpt2lora.peft.lora import apply_lora
from gpt2lora.training.trainer import Trainer


class WritesMarker:
    """Unpickling this runs ``exec``, which creates ``path`` -- what a hostile weights file would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('code ran')",)


@pytest.fixture
def trap(tmp_path) -> tuple[bytes, Path]:
    """A pickle payload and the marker it creates; the payload is shown to work before it is planted."""
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(WritesMarker(marker))
    pickle.loads(payload)  # proving that the trap fires when something unpickles it
    assert marker.read_text() == "code ran"
    marker.unlink()
    return payload, marker


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling or torch.load during the test fails loudly (not just the planted file)."""
    def refuse(*args, **kwargs):
        raise AssertionError("gpt2lora unpickled something")

    for owner, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(owner, name, refuse)


PICKLE_WEIGHTS = ("pytorch_model.bin", "model.ckpt", "pytorch_model.pt")


@pytest.mark.parametrize("name", PICKLE_WEIGHTS)
def test_checkpoint_with_pickle_instead_of_safetensors_is_refused(name, trap, tiny_checkpoint, tmp_path,
                                                                  no_unpickling):
    payload, marker = trap
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(payload)
    with pytest.raises((UnsafeCheckpointError, gpt2lora.CheckpointNotFoundError), match=str(folder)):
        GPT2.from_pretrained(folder)
    assert not marker.exists()


def test_checkpoint_with_pickle_next_to_safetensors_loads_the_safetensors(trap, tiny_checkpoint, tmp_path,
                                                                         no_unpickling):
    payload, marker = trap
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (folder / name).write_bytes(payload)
    planted = GPT2.from_pretrained(folder)
    clean = GPT2.from_pretrained(tiny_checkpoint)
    for (name, a), (_, b) in zip(planted.state_dict().items(), clean.state_dict().items()):
        assert torch.equal(a, b), name
    assert not marker.exists()


def test_classifier_checkpoint_with_pickle_instead_is_refused(trap, clf_checkpoint, tmp_path, no_unpickling):
    payload, marker = trap
    folder = Path(shutil.copytree(clf_checkpoint, tmp_path / "clf"))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model\.bin"):
        GPT2ForSequenceClassification.from_pretrained(folder, num_labels=CLF_LABELS)
    assert not marker.exists()


@pytest.fixture
def adapter(tiny_checkpoint, tmp_path) -> Path:
    model = apply_lora(GPT2.from_pretrained(tiny_checkpoint), LoRAConfig(rank=2, alpha=4), seed=1)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                module.lora_B.add_(0.1)
    return save_adapter(model, tmp_path / "adapter")


def test_adapter_with_pickle_instead_of_safetensors_is_refused(trap, adapter, tiny_checkpoint, no_unpickling):
    payload, marker = trap
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(payload)
    model = GPT2.from_pretrained(tiny_checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"adapter_model\.bin"):
        load_adapter(model, adapter)
    assert not marker.exists()
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # refused before touching the model


def test_adapter_with_pickle_next_to_safetensors_loads_the_safetensors(trap, adapter, tiny_checkpoint,
                                                                      no_unpickling):
    payload, marker = trap
    reference = load_adapter(GPT2.from_pretrained(tiny_checkpoint), adapter).eval()
    (adapter / "adapter_model.bin").write_bytes(payload)
    (adapter / "training_args.bin").write_bytes(payload)
    planted = load_adapter(GPT2.from_pretrained(tiny_checkpoint), adapter).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(planted(ids), reference(ids))
    assert not marker.exists()


def test_training_checkpoint_with_planted_pickles_resumes_without_running_them(trap, tmp_path, no_unpickling):
    payload, marker = trap
    import crash_worker as worker

    out = tmp_path / "run"
    config = TrainConfig(**{**worker.build_config(str(out)).__dict__, "max_steps": 3})
    Trainer(worker.build_model(), config).fit(worker.build_data())
    latest = out / "checkpoint-0000003"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.pt"):
        (latest / name).write_bytes(payload)  # what a transformers Trainer checkpoint would hold
    resumed = Trainer(worker.build_model(lora_seed=5),
                      TrainConfig(**{**config.__dict__, "max_steps": 3, "resume_from": str(out)}))
    history = resumed.fit(worker.build_data())
    assert [s["step"] for s in history.steps] == [1, 2, 3]
    assert not marker.exists()


# --- the package source ------------------------------------------------------------------------------

UNSAFE_CALLS = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"),
                ("marshal", "loads"), ("marshal", "load"), ("dill", "load"), ("joblib", "load"),
                ("yaml", "load"), ("yaml", "unsafe_load"), ("shelve", "open")}


#: Packages the library must not import: code-executing loaders, and the reference implementations (test-only).
FORBIDDEN_MODULES = {"pickle", "marshal", "dill", "joblib", "shelve", "transformers", "peft"}


def unsafe_uses(path: Path) -> list[str]:
    """Calls and imports in one file that could execute code stored in a data file, or pull in the
    reference libraries; aliases (``import torch as t; t.load``, ``from torch import load as read``) count."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}  # local name -> the module or module.attribute it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
                if a.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{path.name}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            # a relative import (`from ..peft.lora import x`) is the package's own, never the peft library
            root = "gpt2lora" if node.level else node.module.split(".")[0]
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if root in FORBIDDEN_MODULES or (node.module, a.name) in UNSAFE_CALLS:
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            owner = aliases.get(node.value.id, node.value.id)
            if (owner, node.attr) in UNSAFE_CALLS:
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr} ({owner}.{node.attr})")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            target = aliases.get(node.func.id, "")
            if node.func.id in {"eval", "exec"}:
                found.append(f"{path.name}:{node.lineno} {node.func.id}()")
            elif tuple(target.rsplit(".", 1)) in UNSAFE_CALLS:
                found.append(f"{path.name}:{node.lineno} {node.func.id}() ({target})")
        elif isinstance(node, ast.keyword) and node.arg in {"weights_only", "allow_pickle", "trust_remote_code"}:
            found.append(f"{path.name}:{node.lineno} {node.arg}=")
    return found


@pytest.mark.parametrize("source, expected", [
    ("import torch\nx = torch.load('w.bin')\n", ["torch.load"]),
    ("import torch as t\nx = t.load('w.bin')\n", ["t.load (torch.load)"]),
    ("from torch import load as read\nx = read('w.bin')\n", ["from torch import load", "read() (torch.load)"]),
    ("from torch import load\n", ["from torch import load"]),
    ("from transformers import GPT2Model\n", ["from transformers import GPT2Model"]),
    ("from transformers.models.gpt2 import modeling_gpt2\n", ["from transformers.models.gpt2 import"]),
    ("from peft import get_peft_model\n", ["from peft import get_peft_model"]),
    ("import peft as p\n", ["import peft"]),
    ("import pickle as p\np.loads(b'')\n", ["import pickle", "p.loads (pickle.loads)"]),
    ("x = eval('1')\n", ["eval()"]),
    ("import torch\nx = torch.load('w.bin', weights_only=False)\n", ["torch.load", "weights_only="]),
    ("import torch\nfrom safetensors.torch import load_file\nx = load_file('w.safetensors')\n", []),
])
def test_the_scanner_finds_unsafe_code(source, expected, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    found = unsafe_uses(bad)
    assert len(found) == len(expected), found
    for fragment, line in zip(expected, found):
        assert fragment in line, (fragment, line)


def test_package_source_never_unpickles_evaluates_or_imports_transformers():
    files = sorted((REPO / "gpt2lora").rglob("*.py"))
    assert len(files) > 10
    problems = [p for f in files for p in unsafe_uses(f)]
    assert problems == []
