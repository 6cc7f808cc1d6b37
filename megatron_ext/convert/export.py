"""Our checkpoints to Hugging Face folders, and HF folders to our checkpoints, in one process.

Export reads any checkpoint layout straight from its files (convert/dist_reader.py), one tensor
or one layer of a tensor at a time, in the one-process layout that megatron's sharded keys
give once assembled; the architecture's mapping turns each into HF tensors (the QKV groups
split into q, k, v; fc1 into gate and up; the vocab padding rows dropped), written into
`model-0000i-of-0000n.safetensors` shards as they come (convert/hf_writer.py), beside
config.json (dtype, RoPE and tie settings of the run), generation_config.json and the source's
tokenizer files, byte for byte, all from the checkpoint's recorded origin (convert/origin.py).
No model is built and no process group is needed: peak memory is about the largest tensor
(and its HF parts), whatever the shard size."""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from megatron_ext.convert.byte_tokenizer import save_byte_tokenizer
from megatron_ext.convert.dist_reader import DistCheckpoint
from megatron_ext.convert.hf_writer import ShardWriter
from megatron_ext.convert.mapping import (EMBEDDING, FINAL_NORM, LAYER_RULES, OUTPUT, TE_NAMES,
                                          Rule, global_rules)

_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # a policy's keys (no prefix)


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


def hf_parts(rule, tensor: torch.Tensor, groups: int, head_dim: int, vocab_size: int
             ) -> List[torch.Tensor]:
    """The HF tensors (in rule.hf order) of one megatron tensor in the one-process layout."""
    if rule.kind == "vocab":
        return [tensor[:vocab_size]]
    if rule.kind == "glu":
        return list(tensor.chunk(2, dim=0))
    if rule.kind == "qkv":  # [q_g; k_g; v_g] per query group back into q, k, v
        rest = tensor.shape[1:]
        per_group = tensor.shape[0] // (groups * head_dim) - 2
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *rest)
        return [p.reshape(-1, *rest) for p in
                grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)]
    return [tensor]


def _sources(ckpt: DistCheckpoint, arch: str, tie: bool, num_layers: int
             ) -> List[Tuple[str, Optional[int], Rule, List[str]]]:
    """(checkpoint key, layer or None, rule, HF names) of every HF tensor, embedding first,
    layer by layer, lm_head last; a missing or unexpected model tensor is an error."""
    stacked = {}  # our layer leaf (local spec names) -> checkpoint key of all layers
    for key in ckpt.tensors:
        if key.startswith("decoder.layers."):
            leaf = key[len("decoder.layers."):]
            stacked[TE_NAMES.get(leaf, leaf)] = key
    rules = global_rules(tie)
    plan = [(EMBEDDING, None, rules[EMBEDDING])]
    plan += [(stacked.get(leaf, f"decoder.layers.{leaf}"), i, rule)
             for i in range(num_layers) for leaf, rule in LAYER_RULES[arch].items()]
    plan += [(FINAL_NORM, None, rules[FINAL_NORM])]
    if not tie:
        plan.append((OUTPUT, None, rules[OUTPUT]))
    used = {key for key, _, _ in plan}
    missing = sorted(used - set(ckpt.tensors))
    unexpected = sorted(k for k in ckpt.tensors if k.startswith(_MODEL_PREFIXES) and k not in used)
    if missing or unexpected:
        raise ValueError(f"checkpoint {ckpt.path} does not hold the {arch} model its origin "
                         f"records: missing {missing}, unexpected {unexpected}")
    depth = {ckpt.shape(key)[0] for key, layer, _ in plan if layer is not None}
    if depth != {num_layers}:
        raise ValueError(f"checkpoint {ckpt.path} holds {sorted(depth)} layers, its train "
                         f"state records {num_layers}")
    return [(key, layer, rule, [n.format(i=layer) for n in rule.hf]) for key, layer, rule in plan]


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
    """Write the HF folder `out` of our checkpoint `checkpoint` (any layout), reading it one
    tensor (one layer of a tensor) at a time and writing each HF tensor straight to its shard
    file: peak memory is about the largest tensor. Returns `out`."""
    from megatron_ext.config.schema import ModelConfig
    from megatron_ext.training.checkpoint import read_train_state
    state = read_train_state(checkpoint)
    origin = state.get("origin")
    if origin is None:
        raise ValueError(f"checkpoint {checkpoint} records no model origin (it predates "
                         "convert); export needs a checkpoint written by this version")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    m = ModelConfig(**{k: v for k, v in checkpoint_model_fields(state).items() if k in known})
    vocab, arch = m.vocab_size, origin.get("architecture") or "LlamaForCausalLM"
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[m.dtype]
    ckpt = DistCheckpoint(checkpoint)
    sources = _sources(ckpt, arch, m.tie_embeddings, m.num_layers)
    plan = []
    for key, layer, rule, names in sources:
        meta = torch.empty(ckpt.shape(key, layer), device="meta")
        parts = hf_parts(rule, meta, m.num_query_groups, head_dim, vocab)
        plan += [(n, dtype, p.shape) for n, p in zip(names, parts)]
    os.makedirs(out, exist_ok=True)
    writer = ShardWriter(out, plan, max_shard_bytes)
    for key, layer, rule, names in sources:
        parts = hf_parts(rule, ckpt.read(key, layer), m.num_query_groups, head_dim, vocab)
        for name, part in zip(names, parts):
            writer.add(name, part.to(dtype).contiguous())
        del parts
    writer.close()
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

