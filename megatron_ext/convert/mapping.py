"""One declarative mapping per Hugging Face architecture: which HF tensors make each megatron
parameter (global names, models/reshard.py) and how.

Kinds: `plain` (renamed; column/row-parallel sliced along the parameter's partition dim, norms
replicated), `qkv` (q, k, v into megatron's linear_qkv, whose rows are, query group by group,
[the group's q heads, its k head, its v head]; a TP shard is a run of whole groups), `glu`
(gate and up into linear_fc1, each TP shard holding [gate_r; up_r]), `vocab` (embedding and
output layer: rows past the real vocab are megatron's zero padding)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class Rule:
    hf: Tuple[str, ...]  # HF tensor names; "{i}" is the global layer number
    kind: str  # plain | qkv | glu | vocab


_ATTN, _MLP = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
_LAYER = {
    "input_layernorm.weight": Rule(("model.layers.{i}.input_layernorm.weight",), "plain"),
    "self_attention.linear_qkv.weight": Rule(tuple(f"{_ATTN}{p}_proj.weight" for p in "qkv"), "qkv"),
    "self_attention.linear_proj.weight": Rule((f"{_ATTN}o_proj.weight",), "plain"),
    "pre_mlp_layernorm.weight": Rule(("model.layers.{i}.post_attention_layernorm.weight",), "plain"),
    "mlp.linear_fc1.weight": Rule((f"{_MLP}gate_proj.weight", f"{_MLP}up_proj.weight"), "glu"),
    "mlp.linear_fc2.weight": Rule((f"{_MLP}down_proj.weight",), "plain"),
}
_QKV_BIAS = {"self_attention.linear_qkv.bias": Rule(tuple(f"{_ATTN}{p}_proj.bias" for p in "qkv"),
                                                    "qkv")}
_QK_NORM = {"self_attention.q_layernorm.weight": Rule((f"{_ATTN}q_norm.weight",), "plain"),
            "self_attention.k_layernorm.weight": Rule((f"{_ATTN}k_norm.weight",), "plain")}
LAYER_RULES = {"LlamaForCausalLM": _LAYER, "MistralForCausalLM": _LAYER,
               "Qwen2ForCausalLM": {**_LAYER, **_QKV_BIAS}, "Qwen3ForCausalLM": {**_LAYER, **_QK_NORM}}
# TE's layer spec fuses the pre-attention and pre-MLP norms into the next linear.
TE_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
            "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}
EMBEDDING = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
# HF files of older transformers versions keep RoPE buffers: not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def global_rules(tie: bool) -> Dict[str, Rule]:
    embed = Rule(("model.embed_tokens.weight",), "vocab")
    return {EMBEDDING: embed, FINAL_NORM: Rule(("model.norm.weight",), "plain"),
            OUTPUT: embed if tie else Rule(("lm_head.weight",), "vocab")}


def rule_for(arch: str, tie: bool, name: str) -> Tuple[Rule, int]:
    """(rule, global layer number or -1) of a megatron global parameter name."""
    if name in global_rules(tie):
        return global_rules(tie)[name], -1
    parts = name.split(".", 3)
    if parts[:2] == ["decoder", "layers"] and len(parts) == 4:
        leaf = TE_NAMES.get(parts[3], parts[3])
        if leaf in LAYER_RULES[arch]:
            return LAYER_RULES[arch][leaf], int(parts[2])
    raise KeyError(f"parameter {name} has no {arch} mapping in megatron_ext/convert/mapping.py; "
                   "the model config enables a feature this architecture lacks")


def hf_names(arch: str, tie: bool, num_layers: int) -> Dict[str, Tuple[str, Rule, int]]:
    """Every HF tensor of the model -> (megatron name, rule, layer): strict accounting."""
    out = {}
    for ours, rule in global_rules(tie).items():
        if not (tie and ours == OUTPUT):
            out.update({n: (ours, rule, -1) for n in rule.hf})
    for i in range(num_layers):
        for leaf, rule in LAYER_RULES[arch].items():
            out.update({n.format(i=i): (f"decoder.layers.{i}.{leaf}", rule, i) for n in rule.hf})
    return out
