"""Spam detection (SMS spam, Enron) with LoRA on the attention layers only, and the per-class picture.

    python examples/spam.py --smoke --data-root ../shared/data
    python examples/spam.py --task enron_spam          # from the hub; no validation split, so test is used

Spam sets are imbalanced, so accuracy alone flatters a model that calls everything ham: this script prints
precision, recall and F1 per class and the confusion matrix next to it.
"""

import argparse
import os

import torch

import gpt2lora as gl
from gpt2lora.training.metrics import per_class_scores

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--task", default="sms_spam", choices=("sms_spam", "enron_spam"))
parser.add_argument("--model", default="gpt2")
parser.add_argument("--data-root", default=None)
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few hundred rows")
parser.add_argument("--vocab", default=None)
parser.add_argument("--out", default="runs/spam")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows = 300 if args.smoke else None

train = gl.load_split(args.task, "train", root=args.data_root, limit=rows)
try:
    held_out = gl.load_split(args.task, "validation", root=args.data_root, limit=rows and 100)
except gl.DataError:  # Enron publishes train and test only
    held_out = gl.load_split(args.task, "test", root=args.data_root, limit=rows and 100)

checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
model = gl.GPT2ForSequenceClassification.from_pretrained(checkpoint, num_labels=2)
# LoRA only where the SST-2 report put it: the fused query/key/value layer
gl.apply_lora(model, gl.LoRAConfig(rank=4, targets=("attn.c_attn",)))
print(gl.count_parameters(model))

pad = tok.eot_token
train_batches = gl.BucketedBatches(gl.encode(train, tok, 256), batch_size=16, seed=0, pad_token_id=pad)
eval_batches = gl.BucketedBatches(gl.encode(held_out, tok, 256), batch_size=32, shuffle=False, pad_token_id=pad)
config = gl.TrainConfig(epochs=1, max_steps=20 if args.smoke else None, progress=not args.smoke)
gl.Trainer(model, config).fit(train_batches, eval_batches)

# Predictions row by row, to look past the averages
model.eval()
predictions, labels = [], []
with torch.no_grad():
    for batch in eval_batches:
        predictions += model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
        labels += batch["labels"].tolist()
print(f"accuracy {100 * gl.accuracy(predictions, labels):.2f}%")
for label, scores in per_class_scores(predictions, labels).items():
    print(f"  {train.label_names[label]:>5}: precision {scores['precision']:.3f}  recall {scores['recall']:.3f}  "
          f"f1 {scores['f1']:.3f}  ({scores['support']} rows)")
print("confusion matrix (rows: gold ham/spam, columns: predicted):", gl.confusion_matrix(predictions, labels, 2))
gl.save_adapter(model, f"{args.out}/adapter")
