"""One word per concept across the package: each rule names the one place a concept is decided."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import gpt2lora as gl
from gpt2lora.config import DEFAULT_LR, GPT2Config
from gpt2lora.devices import set_threads
from gpt2lora.errors import ConfigError
from gpt2lora.model.classifier import is_classifier
from gpt2lora.training.trainer import build_optimizer

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2lora"
MODULES = sorted(PACKAGE.rglob("*.py"))


def occurrences(pattern: str) -> list[str]:
    """``path:line`` of every source line in the package matching ``pattern`` (a regex)."""
    found = []
    for path in MODULES:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}")
    return found


def test_one_is_classifier_in_the_model_layer():
    defined = [f"{p.relative_to(PACKAGE)}:{node.name}" for p in MODULES
               for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.FunctionDef)
               and "is_classifier" in node.name]
    assert defined == ["model/classifier.py:is_classifier"]
    sniffing = occurrences(r'getattr\((model|module), ("score"|HEAD_NAME), None\), nn\.Module\)'
                           r'|hasattr\(model, "(num_labels|lm_head)"\)')
    assert [where.split(":")[0] for where in sniffing] == ["model/classifier.py"]


def test_is_classifier_on_models_and_adapters():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    assert not is_classifier(gl.GPT2(config))
    clf = gl.GPT2ForSequenceClassification(config, num_labels=3)
    assert is_classifier(clf)
    gl.apply_lora(clf, gl.LoRAConfig(rank=2, targets=("attn.c_attn", "lm_head")))  # LoRA on the head itself
    assert is_classifier(clf)


def test_no_two_classes_share_a_name():
    """A ``Protocol`` and the class that implements it may share a name; unrelated classes may not."""
    classes: dict[str, list[str]] = {}
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and "Protocol" not in {ast.unparse(b) for b in node.bases}:
                classes.setdefault(node.name, []).append(str(path.relative_to(PACKAGE)))
    assert {name: where for name, where in classes.items() if len(where) > 1} == {}


def test_default_lr_and_threads_are_resolved_in_one_place():
    assert [w.split(":")[0] for w in occurrences(r"\bdefault_lr\(")] == ["config.py"] * 2  # def + its one call
    assert [w.split(":")[0] for w in occurrences(r"set_num_threads\(")] == ["devices.py"]


def test_the_optimizer_and_the_trainer_agree_on_the_default_lr():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    model = gl.apply_lora(gl.GPT2ForSequenceClassification(config, num_labels=2), gl.LoRAConfig(rank=2))
    trainer = gl.Trainer(model, gl.TrainConfig())
    assert trainer.config.lr == DEFAULT_LR["lora"]
    assert build_optimizer(model, gl.TrainConfig()).param_groups[0]["lr"] == DEFAULT_LR["lora"]
    assert gl.TrainConfig(lr=1e-3).with_default_lr("lora").lr == 1e-3
    with pytest.raises(ConfigError, match=r"min_lr=0.001 is above the default lr 5e-05 of method 'full'"):
        gl.TrainConfig(min_lr=1e-3).with_default_lr(None)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(2)
        assert torch.get_num_threads() == 2
        set_threads(None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match=r"^--threads: expected a positive integer, got 0$"):
        set_threads(0, "--threads")


def test_a_batch_has_an_objective_and_a_task_a_kind():
    from gpt2lora.data.batching import example_objective
    from gpt2lora.data.tasks import TASKS

    lm = [gl.lm_example([1, 2], [3], eos_token_id=0), gl.lm_example([4], [5, 6], eos_token_id=0)]
    classification = [{"input_ids": [1, 2], "label": 1}, {"input_ids": [3], "label": 0}]
    assert [example_objective(ex) for ex in lm + classification] == ["lm"] * 2 + ["classification"] * 2
    assert gl.BucketedBatches(lm, batch_size=2).objective == "lm"
    assert gl.BucketedBatches(classification, batch_size=2).objective == "classification"
    assert not hasattr(gl.BucketedBatches(lm, batch_size=2), "kind")
    assert {preset.kind for preset in TASKS.values()} == {"classification", "nli", "instruction", "qa"}
    assert occurrences(r"\bexample_kind\b|\.kind\b.*\"lm\"") == []


def test_metric_names_are_the_same_end_to_end():
    from gpt2lora.app.publish import CARD_METRICS
    from gpt2lora.app.recipes import FIGURES
    from gpt2lora.app.report import COLUMNS, MAIN_METRICS
    from gpt2lora.training.metrics import CLASSIFICATION_RESULT_METRICS, current_metric_names
    from gpt2lora.training.trainer import CLASSIFICATION_METRICS

    config = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=64)
    clf = gl.GPT2ForSequenceClassification(config, num_labels=2)
    batch = gl.collate([{"input_ids": [1, 2, 3], "label": 0}, {"input_ids": [4, 5], "label": 1}], pad_token_id=0)
    names = set(CLASSIFICATION_RESULT_METRICS)
    assert names <= set(gl.evaluate(clf, [batch])) and names <= set(CLASSIFICATION_METRICS)
    assert names <= {key for key, _, _ in COLUMNS} and "loss" in MAIN_METRICS
    assert names - {"loss"} <= set(CARD_METRICS)
    assert names <= {figure.key for figure in FIGURES.values()}
    # "eval_loss" and "f1" survive only as the published reports' figure names and older run folders' keys
    assert sorted({w.split(":")[0] for w in occurrences(r'"eval_loss"')}) == ["app/recipes.py", "training/metrics.py"]
    assert current_metric_names({"eval_loss": 0.5, "f1": 0.7, "squad_f1": 0.1}) == {"loss": 0.5, "f1_macro": 0.7,
                                                                                     "squad_f1": 0.1}
    assert current_metric_names({"loss": 0.5, "eval_loss": 0.9}) == {"loss": 0.5, "eval_loss": 0.9}


def test_file_names_are_constants():
    from gpt2lora import constants

    names = {value for key, value in vars(constants).items() if key.endswith("_FILE") and isinstance(value, str)}
    names |= set(constants.TOKENIZER_FILES) | set(constants.ADAPTER_FILES)
    spelled = sorted(f"{path.relative_to(PACKAGE)}: {node.value}" for path in MODULES
                     if path.name != "constants.py"
                     for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Constant) and node.value in names)
    assert spelled == []


def test_which_task_kinds_classify_is_said_once():
    assert [w.split(":")[0] for w in occurrences(r'\("classification", "nli"\)')] == ["data/tasks.py"]
