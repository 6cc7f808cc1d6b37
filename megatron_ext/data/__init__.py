"""Data: tokenizers, the built-in reasoning task, JSONL SFT data, packing and sampling."""
