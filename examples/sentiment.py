"""Sentiment classification with LoRA (SST-2, Rotten Tomatoes, IMDB), written with the library's own parts.

    python examples/sentiment.py --smoke --data-root ../shared/data   # tiny random GPT-2: seconds on a CPU
    python examples/sentiment.py --task rotten_tomatoes               # GPT-2 124M and the data from the hub

Every setting of `gpt2lora train` is also reachable from the command line; this script shows the calls.
"""

import argparse
import os

import gpt2lora as gl

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--task", default="sst2", choices=("sst2", "rotten_tomatoes", "imdb"))
parser.add_argument("--model", default="gpt2", help="hub id or checkpoint folder")
parser.add_argument("--data-root", default=None, help="folder holding sst2/, rt_polarity/, imdb/ (else the hub)")
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few hundred rows")
parser.add_argument("--vocab", default=None, help="vocab.json + merges.txt folder for --smoke")
parser.add_argument("--out", default="runs/sentiment")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows = 300 if args.smoke else None

# 1. Data: validated records of each split (a local folder under --data-root, or the hub).
train = gl.load_split(args.task, "train", root=args.data_root, limit=rows)
val = gl.load_split(args.task, "validation", root=args.data_root, limit=rows and 100)

# 2. Model: GPT-2 with a fresh 2-class head, LoRA injected by name after the weights are loaded.
checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
model = gl.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=train.num_labels)
gl.apply_lora(model, gl.LoRAConfig(rank=8, alpha=8, dropout=0.05))
print(gl.count_parameters(model))  # LoRA matrices + the head train; everything else is frozen

# 3. Batches: rows of similar length share a batch, so little padding is computed.
train_batches = gl.BucketedBatches(gl.encode(train, tok, 128), batch_size=16, seed=0, pad_token_id=tok.eot_token)
val_batches = gl.BucketedBatches(gl.encode(val, tok, 128), batch_size=32, shuffle=False,
                                 pad_token_id=tok.eot_token)

# 4. Train (AdamW, 5% warmup, cosine decay, clipping), then evaluate the result.
config = gl.TrainConfig(lr=2e-4, epochs=1, max_steps=20 if args.smoke else None, progress=not args.smoke)
history = gl.Trainer(model, config).fit(train_batches, val_batches)
metrics = gl.evaluate(model, val_batches)
print(f"loss {history.losses[0]:.3f} -> {history.losses[-1]:.3f}; validation accuracy "
      f"{100 * metrics['accuracy']:.2f}%, F1 {metrics['f1_macro']:.4f}; {history.runtime_s:.1f}s, "
      f"{history.memory_added_mb:.0f} MB added by training")

# 5. Keep the adapter (peft layout: peft.PeftModel.from_pretrained loads it onto transformers' GPT-2).
print("adapter:", gl.save_adapter(model, f"{args.out}/adapter"))
