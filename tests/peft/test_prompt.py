"""Prompt tuning: the soft prompt against peft's PROMPT_TUNING (both directions, LM and classifier), masks,
positions, pooling, the trainable set and errors."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from helpers import CLF_LABELS, TINY
from safetensors.torch import load_file
from torch import nn

from gpt2lora import (
    GPT2,
    CheckpointError,
    ConfigError,
    GPT2ForSequenceClassification,
    LoRAConfig,
    load_adapter,
    prepare_model,
    save_adapter,
)
from gpt2lora.peft.prompt import PromptConfig, SoftPrompt, apply_prompt, get_prompt

N_VIRTUAL = 5
NUM_LABELS = CLF_LABELS  # the shared clf_checkpoint's


def tokens(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    # ids start at 1: the test checkpoints use 0 as padding
    return torch.randint(1, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def prompted(kind: str, checkpoint: Path, n: int = N_VIRTUAL, init: str = "vocab") -> nn.Module:
    cls = GPT2 if kind == "lm" else GPT2ForSequenceClassification
    model = cls.from_pretrained(checkpoint).eval()
    return prepare_model(model, "prompt", prompt=PromptConfig(num_virtual_tokens=n, init=init), seed=0)


def hf_class(kind: str):
    return transformers.GPT2LMHeadModel if kind == "lm" else transformers.GPT2ForSequenceClassification


def checkpoint_for(kind: str, tiny_checkpoint: Path, clf_checkpoint: Path) -> Path:
    return tiny_checkpoint if kind == "lm" else clf_checkpoint


def trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# --- config and trainable set -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, fragment", [
    ({"num_virtual_tokens": 0}, "PromptConfig.num_virtual_tokens: expected a positive integer, got 0"),
    ({"num_virtual_tokens": True}, "PromptConfig.num_virtual_tokens"),
    ({"init": "text"}, "PromptConfig.init: expected one of vocab, random, got 'text'"),
])
def test_prompt_config_errors(kwargs, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        PromptConfig(**kwargs)


def test_trainable_set_and_init(tiny_checkpoint, clf_checkpoint) -> None:
    lm = prompted("lm", tiny_checkpoint)
    assert trainable(lm) == {"transformer.prompt.weight"}
    assert lm.training_method == "prompt" and lm.prompt_config.num_virtual_tokens == N_VIRTUAL
    # "vocab" init: every prompt vector is a row of wte
    wte = lm.transformer.wte.weight
    for row in get_prompt(lm).weight:
        assert ((wte - row).abs().amax(dim=1) == 0).any()
    clf = prompted("clf", clf_checkpoint, init="random")
    assert trainable(clf) == {"transformer.prompt.weight", "score.weight"}
    assert 0.5 < get_prompt(clf).weight.std().item() < 1.5  # N(0, 1), peft's RANDOM


def test_optimizer_step_changes_only_prompt_and_head(clf_checkpoint) -> None:
    model = prompted("clf", clf_checkpoint).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(tokens(4, 6)), torch.tensor([0, 1, 2, 1]))
    loss.backward()
    optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in {"transformer.prompt.weight", "score.weight"}), name


# --- forward: masks, positions, pooling ---------------------------------------------------------------

def test_forward_equals_prepended_embeddings_in_transformers(tiny_checkpoint) -> None:
    """The definition: transformers run on [prompt; wte(ids)], the prompt positions dropped from the output."""
    model = prompted("lm", tiny_checkpoint)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()
    ids = tokens()
    embeds = torch.cat([get_prompt(model).weight.expand(2, -1, -1), hf.transformer.wte(ids)], dim=1)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds).logits[:, N_VIRTUAL:]
        ours = model(ids)
    assert ours.shape == (2, 7, TINY["vocab_size"])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)
    with torch.no_grad():  # the prompt really changes the output
        plain = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint).eval()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3


def test_padding_and_explicit_positions_change_nothing_for_real_tokens(tiny_checkpoint, clf_checkpoint) -> None:
    ids = tokens(1, 6)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    lm = prompted("lm", tiny_checkpoint)
    with torch.no_grad():
        alone = lm(ids)
        torch.testing.assert_close(lm(padded, attention_mask=mask)[:, :6], alone, rtol=0, atol=1e-5)
        torch.testing.assert_close(lm(ids, position_ids=torch.arange(6).unsqueeze(0)), alone, rtol=0, atol=1e-6)
        left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
        left_mask = torch.tensor([[0] * 3 + [1] * 6])
        torch.testing.assert_close(lm(left, attention_mask=left_mask)[:, 3:], alone, rtol=0, atol=1e-5)
    clf = prompted("clf", clf_checkpoint)
    with torch.no_grad():  # pooling reads the last real token, counted after the prompt
        torch.testing.assert_close(clf(padded, attention_mask=mask), clf(ids), rtol=0, atol=1e-5)
        torch.testing.assert_close(clf(left, attention_mask=left_mask), clf(ids), rtol=0, atol=1e-5)


# --- peft both ways -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_saved_prompt_loads_in_peft(tiny_checkpoint, clf_checkpoint, tmp_path, kind) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    model = prompted(kind, checkpoint)
    if kind == "clf":
        with torch.no_grad():
            model.score.weight.add_(0.1)  # a "trained" head
    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == N_VIRTUAL
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys == ({"prompt_embeddings"} | ({"base_model.score.weight"} if kind == "clf" else set()))
    twin = peft.PeftModel.from_pretrained(hf_class(kind).from_pretrained(checkpoint), tmp_path / "adapter").eval()
    assert twin.peft_config["default"].task_type == ("CAUSAL_LM" if kind == "lm" else "SEQ_CLS")
    ids = tokens(3, 6)
    with torch.no_grad():
        theirs = twin(input_ids=ids).logits
        ours = model(ids)
    if kind == "lm":
        assert theirs.shape[1] == N_VIRTUAL + 6  # peft returns logits of the virtual positions too
        theirs = theirs[:, N_VIRTUAL:]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_right_padded_lm_matches_peft_on_real_tokens(tiny_checkpoint, tmp_path) -> None:
    model = prompted("lm", tiny_checkpoint)
    save_adapter(model, tmp_path / "adapter")
    twin = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint),
                                          tmp_path / "adapter").eval()
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    with torch.no_grad():
        theirs = twin(input_ids=ids, attention_mask=mask).logits[:, N_VIRTUAL:]
        ours = model(ids, attention_mask=mask)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[1, :4], theirs[1, :4], rtol=0, atol=1e-4)


@pytest.mark.parametrize("lengths", [[6], [6, 3, 4]])
def test_generation_with_a_soft_prompt_matches_peft_and_the_uncached_forward(tiny_checkpoint, tmp_path,
                                                                              lengths) -> None:
    model = prompted("lm", tiny_checkpoint)
    save_adapter(model, tmp_path / "adapter")
    twin = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint),
                                          tmp_path / "adapter").eval()
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):  # left padding, as generation wants it
        ids[row, width - n:] = tokens(1, n, seed=row)[0]
        mask[row, width - n:] = 1
    # 4 positions short of n_positions: transformers 5.24 (peft 0.21.2) embeds one position past the last one it
    # generates, which at exactly n_positions indexes out of wpe; the edge is not what this test is about
    new = 64 - N_VIRTUAL - width - 4
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
    with torch.no_grad():
        theirs = twin.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                               pad_token_id=0)
    # peft ignores position ids under prompt tuning, so a left-padded row gets other positions there; rows
    # without padding must agree token for token, padded rows must equal their own unpadded generation
    assert torch.equal(ours[0, -new:], theirs[0, -new:])
    for row, n in enumerate(lengths[1:], start=1):
        alone = model.generate(ids[row:row + 1, width - n:], max_new_tokens=new, eos_token_id=None)
        assert torch.equal(ours[row, -new:], alone[0, -new:])
    # and the cached steps give what one uncached forward over prompt + continuation gives
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=torch.long)], dim=1)
    with torch.no_grad():
        greedy = model(ours, attention_mask=full_mask)[:, width - 1:-1].argmax(-1)
    assert torch.equal(greedy, ours[:, width:])


@pytest.mark.parametrize("kind", ["lm", "clf"])
def test_peft_saved_prompt_loads_in_gpt2lora(tiny_checkpoint, clf_checkpoint, tmp_path, kind) -> None:
    checkpoint = checkpoint_for(kind, tiny_checkpoint, clf_checkpoint)
    task = "CAUSAL_LM" if kind == "lm" else "SEQ_CLS"
    torch.manual_seed(1)
    twin = peft.get_peft_model(hf_class(kind).from_pretrained(checkpoint),
                               peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    if kind == "clf":
        with torch.no_grad():
            twin.base_model.score.modules_to_save["default"].weight.add_(0.1)
    twin.save_pretrained(tmp_path / "peft")
    twin.eval()
    model = GPT2 if kind == "lm" else GPT2ForSequenceClassification
    loaded = load_adapter(model.from_pretrained(checkpoint).eval(), tmp_path / "peft")
    assert get_prompt(loaded).num_virtual_tokens == 4 and loaded.training_method == "prompt"
    ids = tokens(2, 5)
    with torch.no_grad():
        theirs = twin(input_ids=ids).logits
        ours = loaded(ids)
    torch.testing.assert_close(ours, theirs[:, 4:] if kind == "lm" else theirs, rtol=0, atol=1e-4)


def test_round_trip_through_gpt2lora(clf_checkpoint, tmp_path) -> None:
    model = prompted("clf", clf_checkpoint)
    save_adapter(model, tmp_path / "a")
    fresh = load_adapter(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint).eval(), tmp_path / "a")
    assert trainable(fresh) == {"transformer.prompt.weight", "score.weight"}
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    load_adapter(fresh, tmp_path / "a")  # onto a model that already has a prompt of that size
    assert torch.equal(get_prompt(fresh).weight, get_prompt(model).weight)


# --- errors -------------------------------------------------------------------------------------------

def test_prompt_errors(tiny_checkpoint) -> None:
    model = prompted("lm", tiny_checkpoint)
    with pytest.raises(ConfigError, match="already has a soft prompt"):
        apply_prompt(model, PromptConfig())
    with pytest.raises(ConfigError, match="already has a soft prompt of 5 virtual tokens, not 6"):
        prepare_model(model, "prompt", prompt=PromptConfig(num_virtual_tokens=6))
    with pytest.raises(ConfigError, match="method 'lora' needs a model without one"):
        prepare_model(model, "lora")
    with pytest.raises(ConfigError, match="prompt= is only used by method 'prompt'"):
        prepare_model(GPT2.from_pretrained(tiny_checkpoint), "full", prompt=PromptConfig())
    with pytest.raises(ConfigError, match=r"prompt of 3 tokens \+ 5 soft-prompt vectors \+ max_new_tokens=57 "
                                          "exceeds the model's n_positions=64"):
        model.generate(tokens(1, 3), max_new_tokens=57)
    with pytest.raises(ConfigError, match=r"attention_mask has shape \(2, 9\), expected \(2, 7\)"):
        model(tokens(), attention_mask=torch.ones(2, 9))
    assert model(tokens(1, 59)).shape == (1, 59, TINY["vocab_size"])  # 5 virtual + 59 = n_positions
    with pytest.raises(ConfigError, match="sequence of 65 tokens is longer than the model's n_positions=64"):
        model(tokens(1, 60))
    with pytest.raises(ConfigError, match="leaves no position for text"):
        apply_prompt(GPT2.from_pretrained(tiny_checkpoint), PromptConfig(num_virtual_tokens=64))
    with pytest.raises(ConfigError, match="PromptConfig"):
        apply_prompt(GPT2.from_pretrained(tiny_checkpoint), {"num_virtual_tokens": 3})
    assert isinstance(get_prompt(model), SoftPrompt)


def test_bad_prompt_adapters(tiny_checkpoint, clf_checkpoint, tmp_path) -> None:
    save_adapter(prompted("lm", tiny_checkpoint), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    original = json.loads(path.read_text())

    def load_with(**changes):
        path.write_text(json.dumps({**original, **changes}))
        return load_adapter(GPT2.from_pretrained(tiny_checkpoint), tmp_path / "a")

    with pytest.raises(CheckpointError, match="token_dim is 32, but the model's n_embd is 64"):
        load_with(token_dim=32)
    with pytest.raises(CheckpointError, match=r"shape mismatches: prompt_embeddings: checkpoint \(5, 64\), "
                                              r"model \(6, 64\)"):
        load_with(num_virtual_tokens=6)
    with pytest.raises(CheckpointError, match="field 'num_virtual_tokens' is missing"):
        load_with(num_virtual_tokens=None)
    with pytest.raises(CheckpointError, match="num_transformer_submodules must be 1"):
        load_with(num_transformer_submodules=2)
    with pytest.raises(CheckpointError, match="task_type is 'SEQ_CLS' but the model is a language model"):
        load_with(task_type="SEQ_CLS")
    path.write_text(json.dumps(original))
    with pytest.raises(CheckpointError, match="has 5 virtual tokens but the model's soft prompt has 3"):
        load_adapter(prompted("lm", tiny_checkpoint, n=3), tmp_path / "a")
    with pytest.raises(CheckpointError, match="model with LoRA layers"):
        load_adapter(prepare_model(GPT2.from_pretrained(tiny_checkpoint), "lora", lora=LoRAConfig(rank=2)),
                     tmp_path / "a")
    clf = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint)
    with pytest.raises(CheckpointError, match="task_type is 'CAUSAL_LM'"):
        load_adapter(clf, tmp_path / "a")
    assert get_prompt(clf) is None  # nothing half-applied


# --- command line -------------------------------------------------------------------------------------

def test_cli_trains_and_reloads_a_prompt_run(tmp_path) -> None:
    """``gpt2lora train --method prompt --num-virtual-tokens 6`` on the tiny smoke model, then ``eval``."""
    from helpers import DATA, VOCAB, require_shared

    from gpt2lora.app.cli import main
    from gpt2lora.app.commands import load_run_model

    args = ["--smoke", "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)),
            "--out", str(tmp_path), "--quiet", "--run-name", "p", "--max-steps", "3"]
    assert main(["train", "--task", "sst2", *args, "--method", "prompt", "--num-virtual-tokens", "6"]) == 0
    run = tmp_path / "p"
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == "prompt" and config["prompt"]["num_virtual_tokens"] == 6
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "PROMPT_TUNING" and adapter["num_virtual_tokens"] == 6
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    model, _ = load_run_model(run)
    assert torch.equal(get_prompt(model).weight, saved["prompt_embeddings"])
    assert trainable(model) == {"transformer.prompt.weight", "score.weight"}
    assert main(["eval", "--run", str(run), "--quiet"]) == 0


def test_cli_prompt_run_on_a_generation_task_generates(tmp_path, capsys) -> None:
    """A soft-prompt SQuAD run scores answers by generating them, and ``gpt2lora generate`` continues text."""
    from helpers import DATA, VOCAB, require_shared

    from gpt2lora.app.cli import main

    args = ["--smoke", "--data-root", str(require_shared(DATA)), "--vocab", str(require_shared(VOCAB)),
            "--out", str(tmp_path), "--quiet", "--run-name", "q", "--max-steps", "2", "--eval-rows", "4"]
    assert main(["train", "--task", "squad", *args, "--method", "prompt", "--num-virtual-tokens", "4"]) == 0
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert len(metrics["samples"]) > 0 and all(isinstance(s["prediction"], str) for s in metrics["samples"])
    capsys.readouterr()
    assert main(["generate", "--run", str(tmp_path / "q"), "--max-new-tokens", "5", "Question: where"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("### generated") == 1 and len(printed.split("### generated")[1].strip()) > 0


def test_a_prompt_model_cannot_be_exported_as_a_plain_checkpoint(tiny_checkpoint, tmp_path) -> None:
    from gpt2lora import save_pretrained

    with pytest.raises(CheckpointError, match="soft prompt .* save it with save_adapter"):
        save_pretrained(prompted("lm", tiny_checkpoint), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
