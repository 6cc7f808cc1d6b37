"""Initial weights that depend on the seed and each parameter's global identity only.

megatron draws each stage's weights from that stage's RNG stream, so a pipeline stage that
starts at layer 2 draws other numbers for it than one process does, and PP2 starts from other
weights than PP1. Here every parameter is drawn again from its own CPU generator, seeded by
(seed, layout-free name with the global layer number), in its one-process shape, then cut to
this rank's TP shard: every TP/PP/VPP/DP layout (and CPU or GPU) starts from the same weights.
The distributions are megatron's (TransformerConfig's init methods); the vocab rows megatron
pads the embedding and output layer with are zero.

megatron's own initialisation is off (perform_initialization=False, models/gpt.py): its weights
are allocated uninitialised, so each weight is drawn once, here, or not at all when a
checkpoint or HF weights are loaded right after the build."""
from __future__ import annotations

import hashlib

import torch
from megatron.core.tensor_parallel.layers import (ColumnParallelLinear, RowParallelLinear,
                                                  VocabParallelEmbedding,
                                                  set_tensor_model_parallel_attributes)
from megatron.core.transformer.mlp import MLP

from megatron_ext.models.reshard import global_names, tp_shard
from parallel.topology import Topology

_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def mark_tensor_parallel(chunks) -> None:
    """Give every TP-sharded weight the attributes megatron 0.16.1 sets only inside its weight
    initialisers (tensor_model_parallel, partition_dim, partition_stride), which
    perform_initialization=False skips: without them grad-norm clipping, the distributed
    optimizer and our TP slicing take each shard for a replicated weight. The values are
    megatron's: rows (dim 0) of the embedding and the column-parallel linears, columns (dim 1)
    of the row-parallel ones, stride 2 for a gated MLP's fc1 (mlp.py). Weights that already
    carry them (TransformerEngine sets its own) are left alone."""
    for model in chunks:
        gated = {id(m.linear_fc1) for m in model.modules()
                 if isinstance(m, MLP) and m.config.gated_linear_unit}
        for module in model.modules():
            if isinstance(module, RowParallelLinear):
                dim = 1
            elif isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
                dim = 0
            else:
                continue
            weight = module.weight
            if weight is not None and not hasattr(weight, "tensor_model_parallel"):
                stride = 2 if id(module) in gated else 1
                set_tensor_model_parallel_attributes(weight, True, dim, stride)


def _init_method(name: str, config):
    """megatron's initialiser of a parameter, by its module: N(0, std) for the input-side
    projections, embedding and output layer; the depth-scaled N(0, std / sqrt(2 L)) for the
    projections back into the residual stream; ones for norm scales; zeros for biases."""
    module, _, leaf = name.rpartition(".")
    owner = module.rpartition(".")[2]
    if "bias" in leaf:
        return lambda tensor, generator: tensor.zero_()
    if "norm" in leaf or "norm" in owner:
        return lambda tensor, generator: tensor.fill_(1.0)
    methods = {"word_embeddings": config.embedding_init_method,
               "output_layer": config.init_method,
               "linear_qkv": config.init_method, "linear_fc1": config.init_method,
               "linear_proj": config.output_layer_init_method,
               "linear_fc2": config.output_layer_init_method}
    if leaf != "weight" or owner not in methods:
        raise ValueError(f"no initialisation rule for parameter {name}; add its module to "
                         "megatron_ext/models/init.py _init_method")
    return methods[owner]


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _full_shape(param, tp: int) -> list:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp
    return shape


@torch.no_grad()
def initialize_weights(chunks, seed: int, vocab_size: int, topo: Topology) -> None:
    """Overwrite every parameter of this rank's chunks (GPTModels, DDP-wrapped or not) with
    its seeded, layout-free initial value; vocab_size is the real vocab. One full parameter
    at a time is held, on the CPU."""
    tp, rank = topo.dims.tp, topo.tp_rank
    for chunk in chunks:
        model = getattr(chunk, "module", chunk)
        config = model.config
        for name, param in global_names(model):
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"  # tied: the last stage's copy
            full = torch.zeros(_full_shape(param, tp))
            # the embedding and output layer: the real rows are drawn, the padding stays zero
            drawn = full[:vocab_size] if name in _VOCAB_ROWS else full
            _init_method(name, config)(drawn, generator=_generator(seed, name))
            param.copy_(tp_shard(full, param, name, model, tp, rank))
