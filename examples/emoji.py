"""Tweet emoji prediction (20 classes): LoRA against full fine-tuning on the same rows, side by side.

    python examples/emoji.py --smoke --data-root ../shared/data
    python examples/emoji.py                                   # GPT-2 124M, cardiffnlp/tweet_eval from the hub

The table is what the reports compare: accuracy, trainable parameters and their share, time, memory.
"""

import argparse
import os

import gpt2lora as gl
from gpt2lora.app.report import markdown_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="gpt2")
parser.add_argument("--data-root", default=None)
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few hundred rows")
parser.add_argument("--vocab", default=None)
parser.add_argument("--out", default="runs/emoji")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows = 300 if args.smoke else None

train = gl.load_split("tweet_emoji", "train", root=args.data_root, limit=rows)
val = gl.load_split("tweet_emoji", "validation", root=args.data_root, limit=rows and 100)
checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
pad = tok.eot_token
train_batches = gl.BucketedBatches(gl.encode(train, tok, 64), batch_size=32, seed=0, pad_token_id=pad)
val_batches = gl.BucketedBatches(gl.encode(val, tok, 64), batch_size=64, shuffle=False, pad_token_id=pad)

results = []
for method, lora in (("lora", gl.LoRAConfig(rank=16)), ("full", None)):
    model = gl.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=20, seed=0)
    gl.prepare_model(model, method, lora=lora, seed=0)  # the same fresh head for both
    params = gl.count_parameters(model)
    config = gl.TrainConfig(epochs=1, max_steps=15 if args.smoke else None, progress=not args.smoke)  # lr: method's
    history = gl.Trainer(model, config).fit(train_batches)
    metrics = gl.evaluate(model, val_batches)
    results.append({"method": method, "accuracy": metrics["accuracy"], "f1": metrics["f1_macro"],
                    "trainable_params": params.trainable, "trainable_pct": params.share,
                    "train_time_s": history.runtime_s, "samples_per_s": history.samples_per_s,
                    "peak_memory_mb": history.peak_memory_mb, "memory_added_mb": history.memory_added_mb})
    gl.save_adapter(model, f"{args.out}/{method}")
print(markdown_table(results))
