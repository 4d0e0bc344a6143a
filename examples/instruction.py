"""Instruction following (Alpaca) with LoRA: the loss only on the response, and greedy answers before vs after.

    python examples/instruction.py --smoke --data-root ../shared/data
    python examples/instruction.py --task alpaca --model gpt2-medium

Each row is the Alpaca prompt + the response + <|endoftext|>; the prompt's labels are -100, so the model
learns to write responses, not to repeat instructions.
"""

import argparse
import os

import torch

import gpt2lora as gl
from gpt2lora.training.evaluation import instruction_samples

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--task", default="alpaca_2k", choices=("alpaca_2k", "alpaca", "alpaca_gpt4_demo",
                                                            "llms_from_scratch_instruct"))
parser.add_argument("--model", default="gpt2")
parser.add_argument("--data-root", default=None)
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few dozen rows")
parser.add_argument("--vocab", default=None)
parser.add_argument("--out", default="runs/instruction")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows, max_length, new_tokens = (64, 64, 8) if args.smoke else (None, 512, 128)

records = gl.load_split(args.task, "train", root=args.data_root, limit=rows and rows + 16)
train, held_out = records.records[:-16], records.records[-16:]
records.records = train
checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
model = gl.GPT2.from_pretrained(checkpoint)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
before = instruction_samples(model.to(device), tok, held_out[:3], new_tokens, max_length, device)

gl.apply_lora(model, gl.LoRAConfig(rank=16, dropout=0.05))
print(gl.count_parameters(model))
examples = gl.encode(records, tok, max_length)  # prompt masked: labels -100 up to "### Response:"
share = sum(sum(1 for t in ex["labels"] if t != -100) for ex in examples) / sum(len(ex["labels"]) for ex in examples)
print(f"{len(examples)} rows; {100 * share:.0f}% of their tokens are loss targets")
batches = gl.BucketedBatches(examples, batch_size=8, seed=0, pad_token_id=tok.eot_token)
config = gl.TrainConfig(lr=3e-4, epochs=1, max_steps=10 if args.smoke else None, progress=not args.smoke)
history = gl.Trainer(model, config).fit(batches)
print(f"loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f} in {history.runtime_s:.1f}s")

after = instruction_samples(model, tok, held_out[:3], new_tokens, max_length, device)
for b, a in zip(before, after):
    print(f"### {b['instruction']}\n--- before: {b['generated']!r}\n--- after:  {a['generated']!r}\n"
          f"--- reference: {b['reference'][:120]!r}")
gl.save_adapter(model, f"{args.out}/adapter")
