"""Task presets, file readers, formatting and tokenisation, hub datasets, batching."""
