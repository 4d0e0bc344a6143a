"""Natural language inference (SNLI, MultiNLI, SICK, medical NLI): premise + hypothesis -> 3 classes.

    python examples/nli.py --smoke --data-root ../shared/data
    python examples/nli.py --task mnli --last-n-blocks 6        # LoRA on the last 6 blocks only

The pair is read as "Premise: ...\\nHypothesis: ..." (a long premise is cut so the hypothesis survives) and
the head reads the last real token. LoRA can be limited to the last blocks, one of the reports' knobs.
"""

import argparse
import os

import gpt2lora as gl

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--task", default="snli", choices=("snli", "mnli", "sick", "medical_nli"))
parser.add_argument("--model", default="gpt2")
parser.add_argument("--last-n-blocks", type=int, default=None, help="LoRA in the last N blocks only")
parser.add_argument("--data-root", default=None)
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few hundred rows")
parser.add_argument("--vocab", default=None)
parser.add_argument("--out", default="runs/nli")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows = 300 if args.smoke else None

train = gl.load_split(args.task, "train", root=args.data_root, limit=rows)
val = gl.load_split(args.task, "validation", root=args.data_root, limit=rows and 100)
print(f"{len(train)} pairs, labels {', '.join(train.label_names)}; first: {train.records[0]}")

checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
model = gl.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=train.num_labels)
gl.apply_lora(model, gl.LoRAConfig(rank=8, last_n_blocks=args.last_n_blocks))
print(gl.count_parameters(model))

pad = tok.eot_token
train_batches = gl.BucketedBatches(gl.encode(train, tok, 128), batch_size=16, seed=0, pad_token_id=pad)
val_batches = gl.BucketedBatches(gl.encode(val, tok, 128), batch_size=32, shuffle=False, pad_token_id=pad)
config = gl.TrainConfig(epochs=1, max_steps=20 if args.smoke else None, eval_every_steps=10,
                        progress=not args.smoke)
history = gl.Trainer(model, config).fit(train_batches, val_batches)
for record in history.evals:  # evaluations during training: every 10 steps and at the end
    print(f"step {record['step']:>4}: loss {record['loss']:.4f}, accuracy {100 * record['accuracy']:.2f}%")

# The merged model is a plain GPT-2 classifier that transformers loads (GPT2ForSequenceClassification).
gl.merge_lora(model)
print("merged checkpoint:", gl.save_pretrained(model, f"{args.out}/merged"))
