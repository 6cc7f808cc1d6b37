"""Hugging Face <-> megatron: the declarative mapping per architecture (mapping.py), lazy
per-rank safetensors reads into TP/PP shards (hf_load.py), export and import (export.py; export
streams a dist checkpoint through dist_reader.py into safetensors files through hf_writer.py),
and the model origin a checkpoint records (origin.py)."""
