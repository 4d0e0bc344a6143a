"""Parameter-efficient methods: LoRA/DoRA layers, target selection, injection, merge and the trainable set,
named adapters and mixed batches, initialisations, prompt tuning, training methods, adapter files in
peft's layout, diagnostics."""
