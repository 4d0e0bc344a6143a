"""GPT-2 and its classification head, generation, checkpoint reading and writing (``hub``), the tokenizer
and tensor checks. Knows nothing of adapters, data, training or the application."""
