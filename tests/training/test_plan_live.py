"""The checkpointed backward terms of the memory plan against the tensors alive at a measured peak.

torch's profiler (``profile_memory``) records every CPU tensor allocation and free with the ops around it.
One checkpointed forward + backward of a small LoRA GPT-2 is replayed to the moment most tensor bytes are
alive (``bench_plan.live_peak``, which ``benchmarks/bench_plan.py --where`` runs on the benchmark's shapes);
those bytes are split by who made them: the forward pass (what it kept), the recomputed block (allocated while
a block runs inside backward) and the backward pass's own gradients and temporaries. Each part is compared
with :class:`~gpt2lora.training.memory_plan.CheckpointedBackward`'s term.
"""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import REPO

from gpt2lora import GPT2, LoRAConfig
from gpt2lora.peft.methods import prepare_model
from gpt2lora.training.memory_plan import (
    AFTER_ATTENTION_KEPT_BYTES,
    ModelShape,
    PlanSetting,
    activation_parts,
    after_attention_kept,
    checkpointed_backward,
)

sys.path.insert(0, str(REPO / "benchmarks"))

from bench_plan import LivePeak, live_peak

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpointed_step(shape: ModelShape, rows: int,
                      length: int) -> tuple[LivePeak, PlanSetting, torch.nn.Module]:
    torch.manual_seed(0)
    model = GPT2(shape.config())
    prepare_model(model, "lora", lora=LoRAConfig(), seed=0)
    model.train()
    model.transformer.gradient_checkpointing = True
    ids = torch.randint(0, shape.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, torch.ones_like(ids), labels=ids).backward()

    peak = live_peak(step, list(model.transformer.h))
    setting = PlanSetting(shape, method="lora", batch_size=rows, max_length=length,
                          gradient_checkpointing=True)
    return peak, setting, model


def test_the_peak_is_the_start_of_the_recomputed_blocks_backward():
    """Width 128, 64 tokens: the peak is at the first recomputed block's MLP output projection; what is alive
    there is the blocks' inputs, the whole recomputed block and that projection's two input gradients."""
    peak, setting, model = checkpointed_step(ModelShape(3, 128, 4, vocab_size=300, n_positions=64), 4, 64)
    terms = checkpointed_backward(setting, model)
    assert any("LoRAProductBackward" in op for op in peak.where), peak.where
    assert not any("DropoutAttentionBackward" in op for op in peak.where), peak.where
    assert terms.start_gradients > terms.attention  # the plan picks the same moment
    assert peak.forward == pytest.approx(terms.in_blocks, rel=0.05), (peak, terms)
    assert peak.recomputed == pytest.approx(terms.recomputed, rel=0.05), (peak, terms)
    # the gradients, plus the LoRA factors' own (small) gradients the plan counts apart
    assert peak.backward == pytest.approx(terms.start_gradients, rel=0.10), (peak, terms)
    kept, loss, backward = activation_parts(setting, model)
    assert backward > loss and kept + backward == pytest.approx(terms.peak)
    assert peak.total == pytest.approx(terms.peak, rel=0.05), (peak, terms)


def test_a_long_context_peaks_in_the_attention_with_the_rest_of_the_block_freed():
    """Width 32, 256 tokens: the score blocks outweigh the block; the peak is in the attention's backward,
    after the recomputed block's output projection and MLP half have been freed."""
    shape = ModelShape(2, 32, 4, vocab_size=300, n_positions=256)
    peak, setting, model = checkpointed_step(shape, 2, 256)
    terms = checkpointed_backward(setting, model)
    assert any("DropoutAttentionBackward" in op for op in peak.where), peak.where
    assert terms.attention > terms.start_gradients
    tokens_width = 2 * 256 * 32
    assert peak.forward == pytest.approx(terms.in_blocks, rel=0.05), (peak, terms)
    freed = AFTER_ATTENTION_KEPT_BYTES["lora"] * tokens_width
    assert peak.recomputed == pytest.approx(terms.recomputed - freed, rel=0.10), (peak, terms)
    assert peak.recomputed + peak.backward == pytest.approx(terms.recomputed + terms.attention, rel=0.10), \
        (peak, terms)
    assert peak.total == pytest.approx(terms.peak, rel=0.05), (peak, terms)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_without_checkpointing_the_attention_backward_adds_one_block_of_scores(method):
    """No checkpointing, 256 tokens, width 32: the peak is in the last block's attention backward, and what it
    adds to the kept activations is one block of batch rows' scores at 16 bytes each (8 per score of the
    whole batch, the plan's former term, left the plan 30-40 % short here)."""
    shape = ModelShape(2, 32, 4, vocab_size=300, n_positions=256)
    torch.manual_seed(0)
    model = GPT2(shape.config())
    prepare_model(model, method, lora=LoRAConfig() if method == "lora" else None, seed=0)
    model.train()
    ids = torch.randint(0, shape.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, torch.ones_like(ids), labels=ids).backward()

    peak = live_peak(step, list(model.transformer.h))
    setting = PlanSetting(shape, method=method, batch_size=8, max_length=256)
    kept, loss, backward = activation_parts(setting, model)
    assert any("DropoutAttentionBackward" in op for op in peak.where), peak.where
    assert backward > loss
    # full fine-tuning's parameter gradients are alive too; the plan counts them as gradients, not activations
    gradients = sum(4 * p.numel() for p in model.parameters() if p.requires_grad) if method == "full" else 0
    assert peak.total - gradients == pytest.approx(kept + backward, rel=0.06), (peak, kept, backward)
    # of what the forward kept, the last block's tensors after its attention core are freed by then
    freed = after_attention_kept(method, recomputed=False) * 8 * 256 * shape.n_embd
    assert peak.forward == pytest.approx(kept - freed, rel=0.08), (peak, kept, freed)
