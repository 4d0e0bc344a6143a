"""``gpt2lora quickstart``: the whole workflow offline, in a few minutes on a laptop CPU.

1. build a small GPT-2 whose tokenizer is plain UTF-8 bytes (ids 0-255, EOS = 256: nothing to download);
2. write a synthetic sentiment task: templated reviews whose label follows cue words, with negations
   ("was not dull") that only a model reading the context gets right;
3. pre-train the small model on the review text (language modelling), so there is something to adapt;
4. fine-tune a classifier from it with ``lora``, ``full`` and ``head``, evaluate each on held-out rows;
5. merge the LoRA adapter and check merged == unmerged, save and reload the adapter and the merged
   checkpoint, and print the comparison table (also written to ``<out>/summary.md``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import GPT2Config, LoRAConfig, TrainConfig
from ..constants import HISTORY_FILE, LABEL_NAMES_FILE, RESULTS_FILE, SUMMARY_FILE, TOKENIZER_FILES
from ..data.batching import BucketedBatches, lm_example
from ..data.tasks import Dataset, encode
from ..errors import ConfigError, TrainingError
from ..model.classifier import GPT2ForSequenceClassification
from ..model.gpt2 import GPT2
from ..model.hub import save_pretrained
from ..model.tokenizer import byte_decoder
from ..peft.files import load_adapter
from ..peft.lora import count_parameters, merge_lora
from ..peft.methods import prepare_model
from ..training.history import rewrite as write_history
from ..training.trainer import Trainer
from . import report
from .folders import make_folder
from .run import load_run_model, run
from .runconfig import RunConfig

LABELS = ("negative", "positive")
SUBJECTS = ("the film", "this movie", "the plot", "the acting", "the soundtrack", "the ending", "the script",
            "the cast", "the director's new work", "the sequel", "the last hour", "the dialogue")
CUES = {1: ("wonderful", "brilliant", "delightful", "moving", "superb", "charming", "gripping", "clever"),
        0: ("dull", "awful", "boring", "clumsy", "tedious", "dreadful", "messy", "bland")}
TEMPLATES = ("{s} was {w}.", "i thought {s} was {w}.", "honestly, {s} felt {w} from start to finish.",
             "{s} is {w}, and i would say so again.", "my friends agreed that {s} was {w}.",
             "after two viewings, {s} still seems {w}.")
NEGATED = ("{s} was not {w} at all.", "nobody could call {s} {w}.", "{s} was never {w}, whatever they say.")
FILLER = ("we went on a rainy tuesday.", "the cinema was half empty.", "i had popcorn.",
          "it runs for two hours.", "my brother came along.", "")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255 and ``eot_token`` 256: a tokenizer with no vocabulary file."""

    eot_token = 256
    n_vocab = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def synthetic_reviews(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` labelled one- or two-sentence reviews, the same for the same seed.

    The label is the polarity of the cue word, flipped when the sentence negates it (one in five).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        polarity = rng.randint(0, 1)
        negate = rng.random() < 0.2
        template = rng.choice(NEGATED if negate else TEMPLATES)
        sentence = template.format(s=rng.choice(SUBJECTS), w=rng.choice(CUES[polarity]))
        text = f"{rng.choice(FILLER)} {sentence}".strip()
        rows.append({"text": text, "label": 1 - polarity if negate else polarity})
    return rows


def small_config() -> GPT2Config:
    """4 blocks of width 96 over the 257 byte ids: ~0.5M parameters."""
    return GPT2Config(vocab_size=ByteTokenizer.n_vocab, n_positions=128, n_embd=96, n_layer=4, n_head=4,
                      eos_token_id=ByteTokenizer.eot_token, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def pretrain(texts: list[str], folder: Path, seed: int, steps: int, progress: bool) -> tuple[Path, dict]:
    """Language-model pre-training of the small GPT-2 on ``texts``; saved to ``folder`` (HF layout)."""
    tok = ByteTokenizer()
    model = GPT2.from_config(small_config(), seed=seed)
    examples = [lm_example([], tok.encode_ordinary(t), tok.eot_token, 128) for t in texts]
    data = BucketedBatches(examples, 32, shuffle=True, seed=seed, pad_token_id=tok.eot_token)
    config = TrainConfig(lr=3e-3, min_lr=3e-4, warmup_ratio=0.05, max_steps=steps, batch_size=32,
                         weight_decay=0.01, device="cpu", precision="fp32", seed=seed, progress=progress)
    history = Trainer(model, config).fit(data)
    save_pretrained(model, folder)
    write_history(folder / HISTORY_FILE, history)
    return folder, {"steps": len(history.steps), "first_loss": history.steps[0]["loss"],
                    "last_loss": sum(history.losses[-20:]) / len(history.losses[-20:]),
                    "runtime_s": history.runtime_s}


def write_byte_vocabulary(folder: Path) -> None:
    """``vocab.json`` + ``merges.txt`` of a GPT-2 byte-level BPE with no merges: ids 0-255 are the bytes and
    256 is ``<|endoftext|>``, so :func:`gpt2lora.load_tokenizer` reads the small model like any checkpoint
    and encodes exactly as :class:`ByteTokenizer` does."""
    vocab = {char: byte for char, byte in byte_decoder().items()}
    vocab["<|endoftext|>"] = ByteTokenizer.eot_token
    vocab_file, merges_file = TOKENIZER_FILES
    (folder / vocab_file).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / merges_file).write_text("#version: 0.2\n", encoding="utf-8")


#: The three fine-tuning runs of the quickstart: method and the settings that differ from the defaults.
RUNS: dict[str, dict[str, Any]] = {
    "lora": {"lr": 3e-3, "lora": LoRAConfig(rank=8, alpha=16, dropout=0.0)},
    "full": {"lr": 1e-3},
    "head": {"lr": 2e-2},
}


def run_config(method: str, base: Path, data: Path, folder: Path, seed: int, epochs: int,
               progress: bool) -> RunConfig:
    """The RunConfig of one quickstart run: the small model on the synthetic reviews, evaluated on test."""
    settings = RUNS.get(method, {"lr": 1e-3})
    lr = settings["lr"]
    train = TrainConfig(lr=lr, min_lr=lr / 10, warmup_ratio=0.05, epochs=epochs, batch_size=32, device="cpu",
                        precision="fp32", seed=seed)
    return RunConfig(model=str(base), data=str(data), eval_split="test", max_length=128, method=method,
                     lora=settings.get("lora", LoRAConfig()), train=train, eval_batch_size=64, out=str(folder.parent),
                     quiet=not progress)


def check_lora_merge(folder: Path, base: Path, test: Dataset, seed: int) -> dict[str, float]:
    """Merged == unmerged, reloaded adapter == trained model, merged checkpoint == trained model."""
    tok = ByteTokenizer()
    data = BucketedBatches(encode(test, tok, 128), 64, shuffle=False, pad_token_id=tok.eot_token)
    model, _ = load_run_model(folder)
    unmerged = _logits(model, data)
    reloaded = prepare_model(_classifier(base, seed + 1), "lora", lora=RUNS["lora"]["lora"], seed=seed + 1)
    load_adapter(reloaded, folder / "adapter")
    from_adapter = _logits(reloaded, data)
    merge_lora(model)
    merged = _logits(model, data)
    save_pretrained(model, folder / "merged")
    from_checkpoint = _logits(_classifier(folder / "merged", seed), data)
    diffs = {"merged_vs_unmerged": float((merged - unmerged).abs().max()),
             "reloaded_adapter_vs_trained": float((from_adapter - unmerged).abs().max()),
             "merged_checkpoint_vs_trained": float((from_checkpoint - unmerged).abs().max())}
    bad = {k: v for k, v in diffs.items() if not v < 1e-4}
    if bad:
        raise TrainingError(f"quickstart: outputs differ after merging / reloading the LoRA adapter: {bad}")
    return diffs


def _classifier(base: Path, seed: int) -> GPT2ForSequenceClassification:
    return GPT2ForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=ByteTokenizer.eot_token,
                                                         seed=seed)


@torch.no_grad()
def _logits(model: torch.nn.Module, data: BucketedBatches) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b["input_ids"], b["attention_mask"]) for b in data])


def run_quickstart(out: str | os.PathLike = "runs/quickstart", seed: int = 0, progress: bool = True,
                   rows: int = 2000, pretrain_steps: int = 300, epochs: int = 2) -> list[dict[str, Any]]:
    """Run the offline demo into ``out`` and return the comparison rows (foundation, lora, full, head)."""
    started = time.perf_counter()
    out = Path(out)
    make_folder(out)
    mine = [p.name for p in out.iterdir()]
    if mine:  # it writes data/, base/, foundation/, lora/, full/, head/ and a summary: never over earlier ones
        raise ConfigError(f"quickstart --out {out}: the folder is not empty ({', '.join(sorted(mine)[:6])}"
                          f"{' ...' if len(mine) > 6 else ''}); choose a new or empty folder")
    records = synthetic_reviews(rows + 800, seed)
    splits = {"train": records[:rows], "validation": records[rows:rows + 400], "test": records[rows + 400:]}
    data_dir = out / "data"
    data_dir.mkdir(exist_ok=True)
    for name, recs in splits.items():
        with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    (data_dir / LABEL_NAMES_FILE).write_text(json.dumps(list(LABELS)), encoding="utf-8")
    print(f"[1/4] synthetic task: {len(splits['train'])} train / {len(splits['validation'])} validation / "
          f"{len(splits['test'])} test reviews in {data_dir}")

    base, lm = pretrain([r["text"] for r in splits["train"]], out / "base", seed, pretrain_steps, progress)
    write_byte_vocabulary(base)
    print(f"[2/4] pre-trained a {count_parameters(GPT2.from_pretrained(base)).total:,}-parameter GPT-2 on the "
          f"review text: LM loss {lm['first_loss']:.2f} -> {lm['last_loss']:.2f} in {lm['runtime_s']:.0f}s")

    rows_out = [run(run_config("none", base, data_dir, out / "foundation", seed, epochs, progress),
                    out / "foundation")]
    for method in RUNS:
        row = run(run_config(method, base, data_dir, out / method, seed, epochs, progress), out / method)
        rows_out.append(row)
        print(f"[3/4] {row['method']}: accuracy {100 * row['accuracy']:.1f}% ({row['train_time_s']:.0f}s, "
              f"{row['memory_added_mb']:.0f} MB added by training)")

    test = Dataset("synthetic_reviews", "test", "classification", splits["test"], LABELS, "quickstart")
    diffs = check_lora_merge(out / "lora", base, test, seed)
    print(f"[4/4] LoRA merged into the weights: max |merged - unmerged| = {diffs['merged_vs_unmerged']:.1e}; "
          f"reloaded adapter {diffs['reloaded_adapter_vs_trained']:.1e}; merged checkpoint "
          f"{diffs['merged_checkpoint_vs_trained']:.1e}")
    notes = [(f"synthetic sentiment task (seed {seed}): {rows} train rows, evaluated on "
             f"{len(splits['test'])} test rows; byte-level tokenizer"),
             (f"small GPT-2 pre-trained for {lm['steps']} steps (LM loss {lm['first_loss']:.2f} -> "
             f"{lm['last_loss']:.2f})"),
             (f"LoRA merge check: max |merged - unmerged| = {diffs['merged_vs_unmerged']:.1e}, merged checkpoint "
             f"in {out / 'lora' / 'merged'}, adapter in {out / 'lora' / 'adapter'}"),
             f"total time {time.perf_counter() - started:.0f}s"]
    report.write_json({"rows": rows_out, "merge_check": diffs, "pretraining": lm}, out / RESULTS_FILE)
    report.write_summary(out, rows_out, "gpt2lora quickstart: LoRA vs full fine-tuning vs head only", notes)
    print()
    print(report.markdown_table(rows_out))
    print(f"summary: {out / SUMMARY_FILE}")
    return rows_out
