"""Question answering (SQuAD 1.1) as answer generation: LoRA, then exact match and F1 of greedy answers.

    python examples/qa.py --smoke --data-root ../shared/data
    python examples/qa.py --model gpt2-medium                   # rajpurkar/squad from the hub

The prompt is "Context: ...\\nQuestion: ...\\nAnswer:" (a long context is cut so the question survives); the
answer is learned after it, and scored the SQuAD way (normalised exact match and token F1, best over the
gold answers).
"""

import argparse
import os

import torch

import gpt2lora as gl
from gpt2lora.data.tasks import prompt_ids
from gpt2lora.training.evaluation import generate_texts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="gpt2")
parser.add_argument("--data-root", default=None)
parser.add_argument("--smoke", action="store_true", help="tiny random GPT-2 and a few dozen rows")
parser.add_argument("--vocab", default=None)
parser.add_argument("--out", default="runs/qa")
args = parser.parse_args()
if args.smoke and not (args.data_root or os.environ.get("GPT2LORA_DATA")):  # smoke rows are local: never a silent hub download
    parser.error("--smoke reads local rows: pass --data-root ../shared/data (or set $GPT2LORA_DATA)")
rows, max_length, answered = (64, 128, 4) if args.smoke else (None, 512, 200)

train = gl.load_split("squad", "train", root=args.data_root, limit=rows)
val = gl.load_split("squad", "validation", root=args.data_root, limit=rows and 16)
checkpoint = gl.smoke_checkpoint(args.out, args.vocab, root=args.data_root) if args.smoke else args.model
tok = gl.load_tokenizer(checkpoint)
model = gl.GPT2.from_pretrained(checkpoint)
gl.apply_lora(model, gl.LoRAConfig(rank=8, alpha=16, targets=("attn.c_attn",)))  # the SQuAD report's setting
print(gl.count_parameters(model))

pad = tok.eot_token
train_batches = gl.BucketedBatches(gl.encode(train, tok, max_length), batch_size=8, seed=0, pad_token_id=pad)
val_batches = gl.BucketedBatches(gl.encode(val, tok, max_length), batch_size=16, shuffle=False, pad_token_id=pad)
config = gl.TrainConfig(epochs=1, max_steps=10 if args.smoke else None, progress=not args.smoke)
gl.Trainer(model, config).fit(train_batches, val_batches)
print(f"validation perplexity {gl.evaluate(model, val_batches)['perplexity']:.2f}")

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
questions = val.records[:answered]
prompts = [prompt_ids(tok, r, "qa", max_length) for r in questions]
answers = generate_texts(model.to(device), tok, prompts, 32, device, stop_at_newline=True)  # greedy, batched
scores = gl.squad_metrics(answers, [r["answers"] for r in questions])
print(f"exact match {100 * scores['exact_match']:.2f}%, F1 {100 * scores['f1']:.2f}% over {len(questions)} questions")
for record, answer in list(zip(questions, answers))[:3]:
    print(f"Q: {record['question']}\n   predicted: {answer!r}   gold: {record['answers'][0]!r}")
gl.save_adapter(model, f"{args.out}/adapter")
