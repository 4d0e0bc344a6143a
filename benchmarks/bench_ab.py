"""A/B of two gpt2lora trees (before and after a refactor): a LoRA classification step (B=8, T=128), an LM
LoRA step (B=8, T=176) and batch-1 greedy generation on a randomly initialised 124M-shape model, and batch-1
greedy generation on the same shape loaded from a checkpoint saved by transformers, timed with whichever
gpt2lora is first on the path. Alternate the trees to share the machine's noise:

    for i in 1 2 3; do for t in OLD NEW; do (cd $t && PYTHONPATH=$PWD python benchmarks/bench_ab.py); done; done
"""

import json
import statistics
import tempfile
import time

import torch
import transformers

import gpt2lora as gl

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = gl.GPT2Config()
def med(f, n=3):
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
clf = gl.GPT2ForSequenceClassification.from_config(cfg, num_labels=2)
gl.apply_lora(clf, gl.LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), last_n_blocks=12))
clf.train()
opt = torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, 50257, (8, 128)); mask = torch.ones_like(ids); y = torch.randint(0, 2, (8,))
def cls_step():
    loss = torch.nn.functional.cross_entropy(clf(ids, attention_mask=mask), y); loss.backward(); opt.step(); opt.zero_grad()
lm = gl.GPT2.from_config(cfg, seed=0)
gl.apply_lora(lm, gl.LoRAConfig(rank=8, alpha=16, dropout=0.05, targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), last_n_blocks=12))
lm.train()
opt2 = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-4)
lids = torch.randint(0, 50257, (8, 176)); labels = lids.clone(); labels[:, :40] = -100
def lm_step():
    loss = lm(lids, attention_mask=torch.ones_like(lids), labels=labels) / 1000; loss.backward(); opt2.step(); opt2.zero_grad()
base = gl.GPT2.from_config(cfg, seed=0).eval()
prompt = torch.randint(0, 50257, (1, 16))
def gen():
    base.generate(prompt, max_new_tokens=48, eos_token_id=None)
with tempfile.TemporaryDirectory() as folder:  # a checkpoint as the hub holds one: Conv1D matrices, loaded
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
    loaded = gl.GPT2.from_pretrained(folder).eval()
def gen_loaded():
    loaded.generate(prompt, max_new_tokens=128, eos_token_id=None)
print(json.dumps({"cls_step_s": med(cls_step), "lm_step_s": med(lm_step), "gen_tok_s": 48 / med(gen),
                  "gen_loaded_tok_s": 128 / med(gen_loaded, 5), "where": gl.__file__}))
