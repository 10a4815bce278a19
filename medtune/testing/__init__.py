"""Generated assets for tests and the demo: tiny models, tokenizers and datasets (never downloaded)."""
