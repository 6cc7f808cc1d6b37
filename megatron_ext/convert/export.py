"""Our checkpoints to Hugging Face folders, and HF folders to our checkpoints, in one process.

Export reads any checkpoint layout: megatron's dist_checkpointing reshards it into a one-process
(TP1, PP1) model, whose weights the architecture's mapping turns back into HF tensors (the QKV
groups split into q, k, v; fc1 into gate and up; the vocab padding rows dropped), written as
`model-0000i-of-0000n.safetensors` with their index, beside config.json (dtype, RoPE and tie
settings of the run), generation_config.json and the source's tokenizer files, byte for byte,
all from the checkpoint's recorded origin (convert/origin.py)."""
from __future__ import annotations

import base64
import json
import os
import shutil
from typing import Dict, Iterator, Tuple

import torch

from megatron_ext.convert.byte_tokenizer import save_byte_tokenizer
from megatron_ext.convert.mapping import TE_NAMES, hf_names

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}


def checkpoint_model_fields(state: Dict) -> Dict:
    """The ModelConfig fields of a checkpoint's train state (its origin and shape)."""
    fields = {k: v for k, v in state["origin"]["model"].items() if k not in ("hf_path", "name")}
    return {**fields, "vocab_size": state["shape"]["vocab_size"]}


def _single_process_model(model_fields: Dict, overrides=()):
    """(cfg, topo, chunks): the model of `model_fields` built at TP1/PP1 in this process."""
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    cfg = compose_config(["logging=none", *overrides])
    for key, value in model_fields.items():
        setattr(cfg.model, key, value)
    dims = validate(cfg, 1)
    compat.setup()
    topo = topology.initialize(dims, seed=cfg.seed)
    from megatron_ext.models.gpt import build_gpt_chunks
    return cfg, topo, build_gpt_chunks(cfg, topo, cfg.model.vocab_size, init=False)


def _local_name(name: str) -> str:
    """TE's fused norm names as the local spec's (mapping.TE_NAMES)."""
    head, _, leaf = name.rpartition(".layers.")
    if not head:
        return name
    number, _, rest = leaf.partition(".")
    return f"{head}.layers.{number}.{TE_NAMES.get(rest, rest)}"


def to_hf_tensors(full: Dict[str, torch.Tensor], arch: str, tie: bool, num_layers: int,
                  heads: int, groups: int, head_dim: int, vocab_size: int
                  ) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) of a full one-process state (models/reshard.py global names)."""
    full = {_local_name(k): v for k, v in full.items()}
    per_group = heads // groups
    sources = {(ours, rule, layer) for ours, rule, layer in hf_names(arch, tie, num_layers).values()}
    for ours, rule, layer in sorted(sources, key=lambda s: (s[2], s[0])):
        tensor = full[ours]
        if rule.kind == "vocab":
            parts = [tensor[:vocab_size]]
        elif rule.kind == "glu":
            parts = list(tensor.chunk(2, dim=0))
        elif rule.kind == "qkv":  # [q_g; k_g; v_g] per query group back into q, k, v
            rest = tensor.shape[1:]
            grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *rest)
            parts = [p.reshape(-1, *rest) for p in
                     grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)]
        else:
            parts = [tensor]
        for name, part in zip(rule.hf, parts):
            yield name.format(i=layer), part.contiguous()


def _write_shards(tensors: Dict[str, torch.Tensor], out: str, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _hf_config(origin: Dict, m) -> Dict:
    """config.json of the export: the source's (its dtype set to the run's), or a Llama one
    for a model trained from scratch."""
    dtype = _DTYPE_NAMES[m.dtype]
    if origin.get("hf_config"):
        config = dict(origin["hf_config"])
    else:
        from transformers import LlamaConfig
        rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
        if m.rope_scaling == "linear":
            rope.update(rope_type="linear", factor=m.rope_scaling_factor)
        elif m.rope_scaling == "llama3":
            rope.update(rope_type="llama3", factor=m.rope_scaling_factor, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192)
        config = LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups,
            head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
            max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_epsilon,
            tie_word_embeddings=m.tie_embeddings, rope_parameters=rope).to_dict()
        config["architectures"] = ["LlamaForCausalLM"]
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return config


def export_checkpoint(checkpoint: str, out: str, max_shard_bytes: int = 5 * 2 ** 30) -> str:
    """Write the HF folder `out` of our checkpoint `checkpoint` (any layout); returns `out`."""
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.models.reshard import gather_full_state
    from megatron_ext.training.checkpoint import (CheckpointManager, ModelPart, model_shape,
                                                  read_train_state)
    state = read_train_state(checkpoint)
    origin = state.get("origin")
    if origin is None:
        raise ValueError(f"checkpoint {checkpoint} records no model origin (it predates "
                         "convert); export needs a checkpoint written by this version")
    vocab = state["shape"]["vocab_size"]
    cfg, topo, chunks = _single_process_model(checkpoint_model_fields(state))
    m = cfg.model
    arch = origin.get("architecture") or "LlamaForCausalLM"
    manager = CheckpointManager(os.path.join(out, ".unused"), topo, keep=1,
                                sharded={"model": ModelPart(chunks)}, states={},
                                shape=model_shape(m, vocab, chunks), log=lambda _: None)
    manager.load(checkpoint, only=("model",))
    full = gather_full_state(chunks, topo)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[m.dtype]
    tensors = {n: t.to(dtype) for n, t in to_hf_tensors(
        full, arch, m.tie_embeddings, m.num_layers, m.num_attention_heads, m.num_query_groups,
        chunks[0].config.kv_channels, vocab)}
    del full
    os.makedirs(out, exist_ok=True)
    _write_shards(tensors, out, max_shard_bytes)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(_hf_config(origin, m), f, indent=2)
    generation = origin.get("generation_config") or {"_from_model_config": True}
    if origin["tokenizer"] == "byte":  # trained from scratch on the byte tokenizer
        save_byte_tokenizer(out)
        generation = {"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    for name, data in origin.get("tokenizer_files", {}).items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(base64.b64decode(data))
    shutil.rmtree(os.path.join(out, ".unused"), ignore_errors=True)
    return out


def import_hf(hf_dir: str, out: str) -> str:
    """Write our dist checkpoint `out` of the HF folder `hf_dir` (via the CheckpointManager, so
    any layout loads it and rl.init_checkpoint / train.resume take it); returns `out`."""
    from megatron_ext.config.hf import model_fields
    from megatron_ext.convert.hf_load import load_hf_weights
    from megatron_ext.convert.origin import ModelOrigin
    from megatron_ext.training.checkpoint import CheckpointManager, ModelPart, model_shape
    if os.path.exists(out):
        raise ValueError(f"--out {out} exists; give a new folder")
    cfg, topo, chunks = _single_process_model(model_fields(hf_dir),
                                              ["model=hf", f"model.hf_path={hf_dir}"])
    load_hf_weights(chunks, hf_dir, topo, cfg.model.vocab_size)
    origin = ModelOrigin(cfg)
    origin.record["imported"] = True
    root = out.rstrip("/") + ".importing"
    manager = CheckpointManager(root, topo, keep=1, sharded={"model": ModelPart(chunks)},
                                states={"origin": origin},
                                shape=model_shape(cfg.model, cfg.model.vocab_size, chunks),
                                log=lambda _: None)
    os.rename(manager.save(0), out)
    shutil.rmtree(root)
    return out

