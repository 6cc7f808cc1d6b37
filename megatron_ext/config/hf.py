"""The model shape of a Hugging Face directory (`model=hf model.hf_path=DIR`), read from its
config.json at config load, without importing torch or transformers (config/ is the leaf).

Only what megatron-core's GPTModel computes exactly is accepted: an architecture, a RoPE type
or a config field that would need an approximation is a ConfigError naming it."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from typing import Dict, Optional

from megatron_ext.config.fields import ConfigError

TRAIN_STATE = "train_state.json"  # a checkpoint's JSON state (training/checkpoint/manager.py)
# Architectures whose weights convert/mapping.py knows, and what their attention carries.
ARCHITECTURES = {
    "LlamaForCausalLM": {"qkv_bias": False, "qk_layernorm": False},
    "MistralForCausalLM": {"qkv_bias": False, "qk_layernorm": False},
    "Qwen2ForCausalLM": {"qkv_bias": True, "qk_layernorm": False},
    "Qwen3ForCausalLM": {"qkv_bias": False, "qk_layernorm": True},
}
# megatron-core 0.16.1 applies llama3 RoPE scaling with these constants only
# (RotaryEmbedding._apply_scaling's defaults).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def read_hf_config(hf_path: str) -> Dict:
    """config.json of `hf_path` as a dict; ConfigError when the folder or file is missing."""
    if not hf_path:
        raise ConfigError("model=hf needs model.hf_path=DIR (a Hugging Face model folder with "
                          "config.json and *.safetensors)")
    if not os.path.isdir(hf_path):
        raise ConfigError(f"model.hf_path={hf_path!r} is not a folder; give a Hugging Face "
                          "model directory (a local path, never a hub id)")
    path = os.path.join(hf_path, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model.hf_path={hf_path!r} has no config.json; give the folder "
                          "save_pretrained wrote")
    with open(path) as f:
        return json.load(f)


def architecture(hf: Dict, where: str) -> str:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise ConfigError(f"{where}: architectures={names} is not supported; supported are "
                          f"{sorted(ARCHITECTURES)}")
    return names[0]


def _rope(hf: Dict, where: str) -> Dict:
    """rotary_base, rope_scaling (none|llama3|linear) and its factor from either format:
    transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(theta) != int(theta):
        raise ConfigError(f"{where}: rope_theta={theta} is not an integer, which megatron's "
                          "rotary_base needs")
    out = {"rotary_base": int(theta), "rope_scaling": "none", "rope_scaling_factor": 1.0}
    if kind == "default":
        return out
    if kind not in ("llama3", "linear"):
        raise ConfigError(f"{where}: rope_scaling type {kind!r} is not supported (supported: "
                          "default, llama3, linear)")
    if kind == "llama3":
        odd = {k: params.get(k) for k, v in _LLAMA3_FIXED.items() if float(params.get(k, v)) != v}
        if odd:
            raise ConfigError(f"{where}: llama3 rope_scaling with {odd} is not supported; "
                              f"megatron-core applies it with {_LLAMA3_FIXED}")
    return {**out, "rope_scaling": kind, "rope_scaling_factor": float(params["factor"])}


def _refuse(hf: Dict, where: str) -> None:
    """Fields whose non-default values our GPT cannot compute."""
    checks = [("hidden_act", "silu"), ("mlp_bias", False), ("use_sliding_window", False),
              ("sliding_window", None), ("attention_bias", False)]
    for key, fine in checks:
        value = hf.get(key, fine)
        if key == "attention_bias" and hf.get("architectures") == ["Qwen2ForCausalLM"]:
            continue  # Qwen2's q/k/v biases are part of the architecture
        if key == "sliding_window" and not hf.get("use_sliding_window", True):
            continue  # Qwen2/3 record a window they do not use
        if value != fine:
            raise ConfigError(f"{where}: {key}={value!r} is not supported (only {fine!r})")
    layers = set(hf.get("layer_types") or ["full_attention"])
    if layers != {"full_attention"}:
        raise ConfigError(f"{where}: layer_types {sorted(layers)} are not supported (only "
                          "full_attention)")


def model_fields(hf_path: str) -> Dict:
    """ModelConfig fields of the HF model in `hf_path`."""
    return fields_of(read_hf_config(hf_path), os.path.join(hf_path, "config.json"))


def fields_of(hf: Dict, where: str) -> Dict:
    """ModelConfig fields of an HF config.json's contents (`where` names it in errors)."""
    arch = architecture(hf, where)
    _refuse(hf, where)
    heads = hf["num_attention_heads"]
    return {
        "num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
        "num_attention_heads": heads, "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or hf["hidden_size"] // heads,
        "ffn_hidden_size": hf["intermediate_size"], "vocab_size": hf["vocab_size"],
        "max_position_embeddings": hf["max_position_embeddings"],
        "norm_epsilon": float(hf.get("rms_norm_eps", 1e-6)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        **ARCHITECTURES[arch], **_rope(hf, where),
    }


def start_checkpoint(cfg) -> Optional[str]:
    """The checkpoint a run takes its weights from: train.resume=PATH, else stage=rl's
    rl.init_checkpoint; None when neither names a checkpoint folder."""
    resume = cfg.train.resume
    path = resume if resume not in ("auto", "none") else (
        cfg.rl.init_checkpoint if cfg.stage == "rl" else None)
    return path if path and os.path.isfile(os.path.join(path, TRAIN_STATE)) else None


def hf_origin(path: str) -> Optional[Dict]:
    """The origin the checkpoint `path` records (convert/origin.py) when its model came from a
    Hugging Face folder (imported, or trained from model=hf), else None (also for a damaged
    train state, which the checkpoint's integrity check names when the run loads it)."""
    try:
        with open(os.path.join(path, TRAIN_STATE)) as f:
            origin = json.load(f).get("origin") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return origin if origin.get("architecture") and origin.get("hf_config") else None


def recorded_tokenizer(origin: Dict, where: str) -> str:
    """The tokenizer a checkpoint was trained with: its path while that exists, else the
    files the checkpoint keeps, written once to a folder named by their hash, beside the
    recorded config.json and generation_config.json (whose eos_token_id is the EOS)."""
    path = origin["tokenizer"]
    files = origin.get("tokenizer_files") or {}
    if path == "byte" or os.path.exists(path):
        return path
    if not files:
        raise ConfigError(f"{where}: its tokenizer {path!r} is gone and the checkpoint keeps no "
                          "tokenizer files; add data.tokenizer=DIR (the model's tokenizer folder)")
    configs = {name: origin.get(key) for name, key in (("config.json", "hf_config"), (
        "generation_config.json", "generation_config")) if origin.get(key)}
    digest = hashlib.sha256(json.dumps([files, configs], sort_keys=True).encode()).hexdigest()
    folder = os.path.join(tempfile.gettempdir(), f"megatron_ext-tokenizer-{digest[:16]}")
    if not os.path.isdir(folder):
        tmp = tempfile.mkdtemp(prefix=".megatron_ext-tokenizer-")
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(base64.b64decode(data))
        for name, config in configs.items():
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(config, f, indent=2)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process wrote the same folder first
            shutil.rmtree(tmp)
    # a lone tokenizer.json was a data.tokenizer=FILE.json
    return folder if len(files) > 1 else os.path.join(folder, "tokenizer.json")
