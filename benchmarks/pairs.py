"""Model pairs for the benchmarks: a gpt2lora classifier and a transformers + peft one with the same weights.

Both sides start from one random checkpoint saved by transformers, get LoRA on the same four layers with
the same A matrices (copied from gpt2lora into peft; B starts at zero on both), and train with
``torch.optim.AdamW`` over their trainable tensors. So a step on either side computes the same loss
(checked by :func:`check_same_loss`), and a timing difference is the implementation's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import gpt2lora as gl
from gpt2lora.training.precision import hold_frozen_weights

#: transformers.GPT2Config overrides per benchmark shape (its defaults are the 124M shape).
SHAPES: dict[str, dict[str, Any]] = {
    "gpt2": {},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 512, "vocab_size": 1000},
}
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PAD = 50256  # GPT-2's EOS, used as padding; tiny vocabularies use their last id instead


def pad_id(shape: str) -> int:
    """The padding id of a benchmark shape: EOS for real vocabularies, the last id for tiny ones."""
    vocab = SHAPES[shape].get("vocab_size", 50257)
    return min(PAD, vocab - 1)


def hf_config(shape: str, dropout: float | None = None):
    """The transformers config of ``shape`` for a 2-label classifier (``dropout`` overrides all three)."""
    import transformers

    extra: dict[str, Any] = {}
    if dropout is not None:
        extra = {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}
    return transformers.GPT2Config(**SHAPES[shape], **extra, num_labels=2, pad_token_id=pad_id(shape))


@dataclass
class Side:
    """One contender: its model, its optimizer and how it turns a batch into a loss."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[dict[str, Tensor]], Tensor]
    clip: float | None = None
    """Clip the gradient norm to this before the update (None: no clipping)."""

    def step(self, batch: dict[str, Tensor]) -> float:
        """One training step (forward, backward, optional clipping, AdamW update); returns the loss."""
        loss = self.loss(batch)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def resident_bytes(self) -> int:
        """Bytes this side keeps between steps: its parameters, buffers and optimizer state (each storage once)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    def cuda_peak(self, batch: dict[str, Tensor]) -> int:
        """Peak CUDA bytes of one step of this side as if it were alone on the device: what it keeps between
        steps plus what the step allocates above everything allocated before it (another side's model, an
        earlier benchmark's leftovers stay out)."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.step(batch)
        torch.cuda.synchronize()
        return self.resident_bytes() + torch.cuda.max_memory_allocated() - before


def adamw(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def ours_loss(model: nn.Module, autocast: torch.dtype | None = None) -> Callable[[dict[str, Tensor]], Tensor]:
    def loss(batch: dict[str, Tensor]) -> Tensor:
        with _autocast(batch, autocast):
            logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits.float(), batch["labels"])
    return loss


def reference_loss(model: nn.Module, autocast: torch.dtype | None = None) -> Callable[[dict[str, Tensor]], Tensor]:
    def loss(batch: dict[str, Tensor]) -> Tensor:
        with _autocast(batch, autocast):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    return loss


def _autocast(batch: dict[str, Tensor], dtype: torch.dtype | None):
    device = batch["input_ids"].device.type
    return torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)


def lora_pair(shape: str, rank: int = 8, alpha: float = 16, lora_dropout: float = 0.0,
              dropout: float | None = None, device: str = "cpu", autocast: torch.dtype | None = None,
              seed: int = 0, reference: bool = True, method: str = "lora") -> dict[str, Side]:
    """``{"gpt2lora": Side, "transformers+peft": Side}`` on one random checkpoint of ``shape``.

    ``method="full"`` trains every weight of the gpt2lora model instead (no LoRA; no reference side).
    ``reference=False`` builds only the gpt2lora side.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = transformers.GPT2ForSequenceClassification(hf_config(shape, dropout))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        hf.save_pretrained(folder)
        ours = gl.GPT2ForSequenceClassification.from_pretrained(folder, pad_token_id=pad_id(shape))
    ours.to(device).train()
    if method == "lora":
        gl.apply_lora(ours, gl.LoRAConfig(rank=rank, alpha=alpha, dropout=lora_dropout, targets=TARGETS),
                      seed=seed)
    if autocast == torch.bfloat16:  # what gpt2lora's Trainer does under precision="bf16"
        hold_frozen_weights(ours)
    sides = {"gpt2lora": Side("gpt2lora", ours, adamw(ours), ours_loss(ours, autocast))}
    if reference and method == "lora":
        sides["transformers+peft"] = peft_side(hf, ours, rank, alpha, lora_dropout, device, autocast)
    else:
        del hf
    return sides


def peft_side(hf: nn.Module, ours: nn.Module, rank: int, alpha: float, lora_dropout: float,
              device: str, autocast: torch.dtype | None) -> Side:
    """Wrap ``hf`` with peft LoRA on the same targets and copy ``ours``'s A/B (and head) into it."""
    model = peft_twin(hf, ours, rank, alpha, lora_dropout, "SEQ_CLS", device)
    return Side("transformers+peft", model, adamw(model), reference_loss(model, autocast))


def peft_twin(hf: nn.Module, ours: nn.Module, rank: int, alpha: float, lora_dropout: float, task_type: str,
              device: str) -> nn.Module:
    """``hf`` wrapped with peft LoRA on :data:`TARGETS`, holding ``ours``'s A/B (and classifier head), in train
    mode on ``device``; exits when the two sides would train different parameter counts."""
    import peft

    model = peft.get_peft_model(hf, peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(TARGETS),
        fan_in_fan_out=True, task_type=task_type))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                params[f"base_model.model.{name}.default.weight"].copy_(p)
        if task_type == "SEQ_CLS":
            params["base_model.model.score.modules_to_save.default.weight"].copy_(ours.score.weight)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if trainable != expected:
        raise SystemExit(f"peft trains {trainable} parameters, gpt2lora {expected}: configurations differ")
    return model.to(device).train()


def random_batch(shape: str, batch: int, length: int, device: str = "cpu", seed: int = 0,
                 padded: bool = False) -> dict[str, Tensor]:
    """Random token ids (never the padding id) and labels; ``padded``: right padding of varying length."""
    g = torch.Generator().manual_seed(seed)
    vocab = pad_id(shape)  # ids below the pad id, so the pad id marks padding only
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(batch):
            mask[row, length - row * length // (2 * batch):] = 0
    ids = ids.masked_fill(mask == 0, pad_id(shape))
    labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def check_same_loss(sides: dict[str, Side], batch: dict[str, Tensor], tol: float = 1e-4) -> dict[str, float]:
    """Loss of every side on ``batch`` in eval mode (no dropout); SystemExit if they differ by more than ``tol``."""
    losses = {}
    for name, side in sides.items():
        side.model.eval()
        losses[name] = float(side.loss(batch))
        side.model.train()
    spread = max(losses.values()) - min(losses.values())
    if spread > tol:
        raise SystemExit(f"the contenders compute different losses on the same batch: {losses}")
    return losses


# --- language modelling ---

def target_count(labels: Tensor) -> int:
    """Target tokens of a (B, T) label batch (the next-token shift drops the first position)."""
    return int((labels[:, 1:] != -100).sum())


def ours_lm_loss(model: nn.Module, autocast: torch.dtype | None = None) -> Callable[[dict[str, Tensor]], Tensor]:
    """gpt2lora's LM loss: the head at target positions only, in chunks (``GPT2.forward(labels=...)``)."""
    def loss(batch: dict[str, Tensor]) -> Tensor:
        with _autocast(batch, autocast):
            total = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"),
                          labels=batch["labels"])
        return total / max(target_count(batch["labels"]), 1)
    return loss


def full_logits_lm_loss(model: nn.Module, autocast: torch.dtype | None = None
                        ) -> Callable[[dict[str, Tensor]], Tensor]:
    """The LM loss as gpt2lora computed it before: full (B, T, vocab) logits, then cross-entropy."""
    def loss(batch: dict[str, Tensor]) -> Tensor:
        with _autocast(batch, autocast):
            logits = model(batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
        flat = logits[:, :-1].reshape(-1, logits.size(-1)).float()
        total = F.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        return total / max(target_count(batch["labels"]), 1)
    return loss


def lm_pair(shape: str, rank: int = 8, alpha: float = 16, lora_dropout: float = 0.0,
            dropout: float | None = None, device: str = "cpu", autocast: torch.dtype | None = None,
            seed: int = 0, full_logits: bool = False, clip: float | None = 1.0) -> dict[str, Side]:
    """``{"gpt2lora": Side, "transformers+peft": Side}`` language models with LoRA on one random checkpoint.

    ``full_logits``: also ``"gpt2lora, full logits"``, a copy of the gpt2lora model with the old loss path.
    transformers + peft computes its loss with ``model(..., labels=...)``.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(hf_config(shape, dropout))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        hf.save_pretrained(folder)
        models = [gl.GPT2.from_pretrained(folder) for _ in range(2 if full_logits else 1)]
    lora = gl.LoRAConfig(rank=rank, alpha=alpha, dropout=lora_dropout, targets=TARGETS)
    for model in models:
        model.to(device).train()
        gl.apply_lora(model, lora, seed=seed)
        if autocast == torch.bfloat16:  # what gpt2lora's Trainer does under precision="bf16"
            hold_frozen_weights(model)
    ours = models[0]
    sides = {"gpt2lora": Side("gpt2lora", ours, adamw(ours), ours_lm_loss(ours, autocast), clip)}
    if full_logits:
        sides["gpt2lora, full logits"] = Side("gpt2lora, full logits", models[1], adamw(models[1]),
                                              full_logits_lm_loss(models[1], autocast), clip)
    reference = peft_twin(hf, ours, rank, alpha, lora_dropout, "CAUSAL_LM", device)
    sides["transformers+peft"] = Side("transformers+peft", reference, adamw(reference),
                                      reference_loss(reference, autocast), clip)
    return sides
