"""Where a checkpoint's model came from, kept in its train state (a JSON-able stateful): the
HF architecture, config.json and generation_config.json, the model config, and the tokenizer
files byte for byte (base64), so `convert export` needs no template and loses no chat template.
A model trained from scratch records its model config and tokenizer spec only."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
from typing import Dict, Optional

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def _json(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def tokenizer_files(folder: str) -> Dict[str, str]:
    """name -> base64 of the tokenizer files in `folder`."""
    out = {}
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = base64.b64encode(f.read()).decode("ascii")
    return out


def describe(model_cfg, tokenizer: str) -> Dict:
    """The origin record of a model config (model=hf: its folder) and data.tokenizer."""
    record = {"model": dataclasses.asdict(model_cfg), "tokenizer": tokenizer,
              "architecture": None, "hf_config": None, "generation_config": None,
              "tokenizer_files": {}}
    hf = model_cfg.hf_path
    if hf:
        from megatron_ext.config.hf import architecture, read_hf_config
        config = read_hf_config(hf)
        record.update(architecture=architecture(config, hf), hf_config=config,
                      generation_config=_json(os.path.join(hf, "generation_config.json")))
    if tokenizer != "byte":
        folder = tokenizer if os.path.isdir(tokenizer) else None
        if folder:
            record["tokenizer_files"] = tokenizer_files(folder)
        elif os.path.isfile(tokenizer):
            with open(tokenizer, "rb") as f:
                record["tokenizer_files"] = {"tokenizer.json": base64.b64encode(f.read()).decode()}
    return record


class ModelOrigin:
    """The checkpoint state "origin". A resumed or RL-initialised run keeps the origin of the
    checkpoint it started from (load_state_dict); so does a run whose shape came from that
    checkpoint's HF origin (no model=hf: config/load.py from_checkpoint_origin), from the start,
    since an imported checkpoint gives its weights only."""

    def __init__(self, cfg):
        from megatron_ext.config.hf import hf_origin, start_checkpoint
        start = None if cfg.model.hf_path else start_checkpoint(cfg)
        recorded = hf_origin(start) if start else None
        if recorded is not None:  # this run's model config, the recorded source
            self.load_state_dict({**recorded, "model": dataclasses.asdict(cfg.model)})
        else:
            self.record = describe(cfg.model, cfg.data.tokenizer)

    def state_dict(self) -> Dict:
        return self.record

    def load_state_dict(self, state: Dict) -> None:
        """Adopt a checkpoint's record; what this run saves is not an import (weights only)."""
        self.record = {k: v for k, v in state.items() if k != "imported"}
