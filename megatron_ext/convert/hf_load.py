"""Hugging Face safetensors weights into this rank's megatron chunks: each rank opens the files
lazily (safetensors.safe_open maps them, reading nothing up front), reads only the tensors of
its own pipeline stages and, of those, only the rows or columns of its own TP shard. No rank
ever holds the whole model, or even one whole TP-sharded tensor."""
from __future__ import annotations

import glob
import json
import os
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext.config.hf import architecture, read_hf_config
from megatron_ext.convert.mapping import IGNORED_SUFFIXES, Rule, hf_names, rule_for
from megatron_ext.models.reshard import global_names
from parallel.topology import Topology

INDEX = "model.safetensors.index.json"


class HFWeightsError(ValueError):
    """An HF folder whose weights do not match its config (missing, unexpected, misshapen)."""


class HFWeights:
    """The tensors of an HF folder by name, opened lazily, read by slices."""

    def __init__(self, hf_dir: str):
        index = os.path.join(hf_dir, INDEX)
        if os.path.isfile(index):
            with open(index) as f:
                self.file_of = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
        else:
            files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
            if not files:
                pickles = glob.glob(os.path.join(hf_dir, "pytorch_model*.bin"))
                hint = (" (only pytorch_model*.bin pickles, which we do not unpickle: convert "
                        "them once with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                        ".save_pretrained(OUT, safe_serialization=True))") if pickles else ""
                raise HFWeightsError(f"{hf_dir} holds no *.safetensors weights{hint}")
            from safetensors import safe_open
            self.file_of = {}
            for path in files:
                with safe_open(path, framework="pt") as f:
                    self.file_of.update({k: path for k in f.keys()})
        self._open: Dict[str, object] = {}

    def names(self) -> List[str]:
        return [n for n in self.file_of if not n.endswith(IGNORED_SUFFIXES)]

    def slice(self, name: str):
        from safetensors import safe_open
        path = self.file_of[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_slice(name)

    def read(self, name: str, shape, dim: int = 0, start: int = 0, stop=None) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of tensor `name`, whose full shape
        must be `shape` (what config.json implies)."""
        sl = self.slice(name)
        got = list(sl.get_shape())
        if got != list(shape):
            raise HFWeightsError(f"HF tensor {name} has shape {got}, config.json implies "
                                 f"{list(shape)}; the weights and config.json disagree")
        index = [slice(None)] * len(got)
        index[dim] = slice(start, stop)
        return sl[tuple(index)]


def account(weights: HFWeights, arch: str, tie: bool, num_layers: int) -> None:
    """Strict key accounting: every expected tensor present, nothing else there."""
    expected = hf_names(arch, tie, num_layers)
    present = set(weights.names())
    if tie:
        present.discard("lm_head.weight")  # some tied exports keep a copy; the embedding wins
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise HFWeightsError(f"{arch} weights do not match config.json: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")


def _shard(weights: HFWeights, rule: Rule, layer: int, param, config, vocab_size: int,
           tp: int, rank: int) -> torch.Tensor:
    """This rank's shard of one megatron parameter, read from the HF tensors of `rule`."""
    names = [n.format(i=layer) for n in rule.hf]
    parallel = getattr(param, "tensor_model_parallel", False) and tp > 1
    shape = list(param.shape)
    if rule.kind == "vocab":
        rows = shape[0]
        start = rank * rows if parallel else 0
        stop = min(start + rows, vocab_size)
        real = weights.read(names[0], [vocab_size] + shape[1:], 0, start, max(stop, start))
        if stop - start == rows:
            return real  # no padding rows on this shard: no second copy
        out = torch.zeros(shape, dtype=real.dtype)
        out[:real.shape[0]] = real
        return out
    if rule.kind == "glu":  # [gate_r; up_r]
        rows = shape[0] // 2
        full = [rows * (tp if parallel else 1)] + shape[1:]
        start = rank * rows if parallel else 0
        return torch.cat([weights.read(n, full, 0, start, start + rows) for n in names])
    if rule.kind == "qkv":  # whole query groups: [q_g; k_g; v_g] group by group
        d, groups = config.kv_channels, config.num_query_groups
        per_group = config.num_attention_heads // groups
        mine = groups // tp if parallel else groups
        g0 = rank * mine if parallel else 0
        rest = shape[1:]
        q = weights.read(names[0], [groups * per_group * d] + rest, 0, g0 * per_group * d,
                         (g0 + mine) * per_group * d)
        k, v = (weights.read(n, [groups * d] + rest, 0, g0 * d, (g0 + mine) * d) for n in names[1:])
        parts = [q.reshape(mine, per_group * d, *rest), k.reshape(mine, d, *rest),
                 v.reshape(mine, d, *rest)]
        return torch.cat(parts, dim=1).reshape(shape)
    if not parallel:
        return weights.read(names[0], shape)
    dim = param.partition_dim
    full = list(shape)
    full[dim] *= tp
    return weights.read(names[0], full, dim, rank * shape[dim], (rank + 1) * shape[dim])


@torch.no_grad()
def load_hf_weights(chunks, hf_dir: str, topo: Topology, vocab_size: int,
                     skip: Optional[Callable[[str], bool]] = None) -> None:
    """Copy this rank's shards of the HF weights in `hf_dir` into `chunks` (its megatron
    chunks, DDP-wrapped or not), cast to each parameter's dtype; the vocab padding rows are
    zero. `skip(name)` leaves parameters (global names) as they are, e.g. the critic's value
    head. A tensor missing from the files, one the model does not have, or a shape that
    disagrees with config.json is an HFWeightsError naming them."""
    hf = read_hf_config(hf_dir)
    arch = architecture(hf, os.path.join(hf_dir, "config.json"))
    weights = HFWeights(hf_dir)
    tie = bool(hf.get("tie_word_embeddings", False))
    account(weights, arch, tie, hf["num_hidden_layers"])
    tp, rank = topo.dims.tp, topo.tp_rank
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        for name, param in global_names(chunk):
            if skip is not None and skip(name):
                continue
            rule, layer = rule_for(arch, tie, name)
            shard = _shard(weights, rule, layer, param, model.config, vocab_size, tp, rank)
            param.copy_(shard.to(param.dtype))
            if getattr(param, "main_param", None) is not None:
                param.main_param.copy_(shard)
