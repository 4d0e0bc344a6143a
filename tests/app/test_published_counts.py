"""Trainable-parameter counts of the published reports, on real-size models built on the meta device.

Nothing is allocated: the models are built under ``torch.device("meta")`` (shapes only), LoRA or the soft
prompt is applied, and the counts are compared with the numbers the reports print.
"""

from __future__ import annotations

import pytest
import torch

from gpt2lora import (
    GPT2,
    GPT2Config,
    GPT2ForSequenceClassification,
    LoRAConfig,
    count_parameters,
    prepare_model,
)
from gpt2lora.peft.lora import apply_lora, lora_modules
from gpt2lora.peft.prompt import PromptConfig

#: CS 7643 report, Table 4: GPT-2 355M, from-scratch LoRA on every linear layer and the LM head.
CS7643_TARGETS = ("attn.q", "attn.k", "attn.v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj", "lm_head")
CS7643_TABLE4 = {2: 987_298, 4: 1_974_596, 8: 3_949_192, 16: 7_898_384, 32: 15_796_768}


def meta_lm(preset: str) -> GPT2:
    with torch.device("meta"):
        return GPT2(GPT2Config.from_preset(preset))


def test_meta_models_allocate_nothing() -> None:
    model = apply_lora(meta_lm("gpt2-medium"), LoRAConfig(rank=2, targets=CS7643_TARGETS, style="from_scratch"))
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_squad_report_c_attn_rank_8() -> None:
    """SQuAD report: GPT-2 124M, r 8, alpha 16, LoRA on attn.c_attn only -> 294,912 (12 x 8 x (768 + 2304))."""
    model = apply_lora(meta_lm("gpt2"), LoRAConfig(rank=8, alpha=16, targets=("attn.c_attn",)))
    counts = count_parameters(model)
    assert counts.trainable == 294_912 == 12 * 8 * (768 + 3 * 768)
    assert counts.total == 124_439_808 + 294_912  # GPT-2 124M with the tied head counted once


@pytest.mark.parametrize("rank", sorted(CS7643_TABLE4))
def test_cs7643_table4_language_model_head(rank) -> None:
    model = apply_lora(meta_lm("gpt2-medium"),
                       LoRAConfig(rank=rank, alpha=16, targets=CS7643_TARGETS, style="from_scratch"))
    d, ff, vocab = 1024, 4096, 50257
    per_block = 3 * rank * (d + d) + rank * (d + d) + rank * (d + ff) + rank * (ff + d)
    arithmetic = 24 * per_block + rank * (d + vocab)
    assert count_parameters(model).trainable == arithmetic == CS7643_TABLE4[rank]
    # the head LoRA sits on the LM head (vocab 50257), the q/k/v pairs on slices of c_attn
    shapes = {name: tuple(m.lora_B.shape) for name, m in lora_modules(model) if name == "lm_head"}
    assert shapes == {"lm_head": (vocab, rank)}


def test_cs7643_numbers_do_not_come_from_a_classification_head() -> None:
    """With num_labels 2 the head LoRA would be r x (1024 + 2): r 2 gives 886,788, not the published 987,298."""
    with torch.device("meta"):
        clf = GPT2ForSequenceClassification(GPT2Config.from_preset("gpt2-medium"), num_labels=2)
    apply_lora(clf, LoRAConfig(rank=2, targets=CS7643_TARGETS, style="from_scratch"))
    trainable = count_parameters(clf).trainable
    assert trainable == 24 * 2 * (3 * 2048 + 2048 + 5120 + 5120) + 2 * (1024 + 2) == 886_788
    assert trainable != CS7643_TABLE4[2]
    assert not clf.score.weight.requires_grad  # lm_head on a classifier: LoRA on score, base frozen


def test_sst2_prelayer_is_a_60_token_soft_prompt() -> None:
    model = prepare_model(meta_lm("gpt2"), "prompt", prompt=PromptConfig(num_virtual_tokens=60))
    counts = count_parameters(model)
    assert counts.trainable == 46_080 == 60 * 768
    assert f"{counts.share:.3f}" == "0.037"
    # the other reading of "PreLayer": whole embedding tables, three orders of magnitude more
    tables = count_parameters(prepare_model(meta_lm("gpt2"), "embeddings")).trainable
    assert tables == (50257 + 1024) * 768
