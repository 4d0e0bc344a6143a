"""prepare_model: the exact trainable set of each training method, on the LM and the classifier."""

from __future__ import annotations

import pytest
import torch
import transformers

from gpt2lora import GPT2, ConfigError, GPT2Config, count_parameters
from gpt2lora.config import LoRAConfig
from gpt2lora.model.classifier import GPT2ForSequenceClassification
from gpt2lora.peft.methods import METHODS, prepare_model

BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")
EMBEDDINGS = {"transformer.wte.weight", "transformer.wpe.weight"}
LN_F = {"transformer.ln_f.weight", "transformer.ln_f.bias"}


def block(i: int) -> set[str]:
    return {f"transformer.h.{i}.{p}" for p in BLOCK_PARAMS}


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_methods_list() -> None:
    assert METHODS == ("lora", "full", "last_n_full", "embeddings", "head", "prompt")


@pytest.mark.parametrize("method, last_n, expected", [
    ("full", None, EMBEDDINGS | block(0) | block(1) | LN_F | {"score.weight"}),
    ("last_n_full", 1, block(1) | LN_F | {"score.weight"}),
    ("last_n_full", 2, block(0) | block(1) | LN_F | {"score.weight"}),
    ("embeddings", None, EMBEDDINGS | {"score.weight"}),
    ("head", None, {"score.weight"}),
])
def test_classifier_trainable_sets(clf_checkpoint, method, last_n, expected) -> None:
    model = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint)
    for p in model.parameters():  # start from a mixed state: prepare_model must set every flag
        p.requires_grad_(False)
    model.transformer.h[0].ln_1.weight.requires_grad_(True)
    prepare_model(model, method, last_n=last_n)
    assert trainable(model) == expected
    assert model.training_method == method and model.training_last_n == last_n


@pytest.mark.parametrize("method, last_n, expected", [
    ("full", None, EMBEDDINGS | block(0) | block(1) | LN_F),
    ("last_n_full", 1, block(1) | LN_F),  # the tied head (= wte) stays frozen
    ("embeddings", None, EMBEDDINGS),  # wte is the tied head
])
def test_lm_trainable_sets(tiny_checkpoint, method, last_n, expected) -> None:
    model = prepare_model(GPT2.from_pretrained(tiny_checkpoint), method, last_n=last_n)
    assert trainable(model) == expected
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.requires_grad == ("transformer.wte.weight" in expected)


def test_full_counts_match_transformers(tiny_checkpoint) -> None:
    model = prepare_model(GPT2.from_pretrained(tiny_checkpoint), "full")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_checkpoint)
    counts = count_parameters(model)
    assert counts.trainable == counts.total == hf.num_parameters()


def test_head_on_untied_lm_trains_lm_head() -> None:
    model = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=8, vocab_size=32,
                            tie_word_embeddings=False))
    assert trainable(prepare_model(model, "head")) == {"lm_head.weight"}
    assert "lm_head.weight" in trainable(prepare_model(model, "last_n_full", last_n=1))


def test_head_on_tied_lm_is_rejected(tiny_checkpoint) -> None:
    with pytest.raises(ConfigError, match=r"'head'.*tied.*embeddings"):
        prepare_model(GPT2.from_pretrained(tiny_checkpoint), "head")


def test_lora_method_applies_lora(clf_checkpoint) -> None:
    model = prepare_model(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint), "lora",
                          lora=LoRAConfig(rank=2, targets=("attn.c_attn",), last_n_blocks=1))
    assert trainable(model) == {"transformer.h.1.attn.c_attn.lora_A", "transformer.h.1.attn.c_attn.lora_B",
                                "score.weight"}
    assert model.lora_config.rank == 2
    default = prepare_model(GPT2ForSequenceClassification.from_pretrained(clf_checkpoint), "lora")
    assert default.lora_config == LoRAConfig()


def test_embeddings_share_of_gpt2_124m() -> None:
    """The 'PreLayer' baseline on GPT-2 124M trains the two embedding tables (39.4M) plus the head."""
    with torch.device("meta"):
        model = GPT2ForSequenceClassification(GPT2Config.from_preset("gpt2"), num_labels=2)
    counts = count_parameters(prepare_model(model, "embeddings"))
    assert counts.trainable == 50257 * 768 + 1024 * 768 + 2 * 768
    assert counts.total == 124_439_808 + 2 * 768  # GPT-2 124M body + score


@pytest.mark.parametrize("kwargs, fragment", [
    ({"method": "prefix"}, "unknown method 'prefix'"),
    ({"method": "last_n_full"}, r"last_n in 1\.\.2"),
    ({"method": "last_n_full", "last_n": 3}, r"has 2 blocks\), got last_n=3"),
    ({"method": "last_n_full", "last_n": 0}, "last_n=0"),
    ({"method": "full", "last_n": 1}, "last_n is only used by method 'last_n_full'"),
    ({"method": "lora", "last_n": 1}, "LoRAConfig.last_n_blocks"),
    ({"method": "full", "lora": LoRAConfig()}, "lora= is only used by method 'lora'"),
])
def test_bad_arguments(tiny_checkpoint, kwargs, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment):
        prepare_model(GPT2.from_pretrained(tiny_checkpoint), **kwargs)


def test_other_method_on_lora_model_is_rejected(tiny_checkpoint) -> None:
    model = prepare_model(GPT2.from_pretrained(tiny_checkpoint), "lora")
    with pytest.raises(ConfigError, match=r"already has LoRA \(transformer\.h\.0\.attn\.c_attn"):
        prepare_model(model, "full")
    with pytest.raises(ConfigError, match="already applied"):
        prepare_model(model, "lora")


def test_prompt_method_trains_only_the_prompt_and_score(clf_checkpoint) -> None:
    from gpt2lora.peft.methods import trainable_names
    from gpt2lora.peft.prompt import PromptConfig

    model = GPT2ForSequenceClassification.from_pretrained(clf_checkpoint)
    with pytest.raises(ConfigError, match="method 'prompt' needs a soft prompt"):
        trainable_names(model, "prompt")
    prepare_model(model, "prompt", prompt=PromptConfig(num_virtual_tokens=3), seed=0)
    assert trainable(model) == {"transformer.prompt.weight", "score.weight"}
    assert model.transformer.prompt.weight.shape == (3, 64)
    with pytest.raises(ConfigError, match="method 'full' needs a model without one"):
        prepare_model(model, "full")
