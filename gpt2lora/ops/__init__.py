"""Exact kernels that make training and decoding cheap: attention with dropout, 1-byte dropout masks,
recomputed outputs, few-row products, many-row half-precision products, the chunked LM-head loss and the LoRA
product. Imports torch and ``gpt2lora.errors`` only."""
