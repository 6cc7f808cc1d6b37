"""Initial weights that depend on the seed and each parameter's global identity only.

megatron draws each stage's weights from that stage's RNG stream, so a pipeline stage that
starts at layer 2 draws other numbers for it than one process does, and PP2 starts from other
weights than PP1. Here every parameter is drawn again from its own CPU generator, seeded by
(seed, layout-free name with the global layer number), in its one-process shape, then cut to
this rank's TP shard: every TP/PP/VPP/DP layout (and CPU or GPU) starts from the same weights.
The distributions are megatron's (TransformerConfig's init methods); the vocab rows megatron
pads the embedding and output layer with are zero."""
from __future__ import annotations

import hashlib

import torch

from megatron_ext.models.reshard import global_names, tp_shard
from parallel.topology import Topology

_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


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
    """Overwrite every parameter of this rank's chunks (unwrapped GPTModels, before DDP) with
    its seeded, layout-free initial value; vocab_size is the real vocab. One full parameter
    at a time is held, on the CPU."""
    tp, rank = topo.dims.tp, topo.tp_rank
    for model in chunks:
        config = model.config
        for name, param in global_names(model):
            if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"  # tied: the last stage's copy
            full = torch.zeros(_full_shape(param, tp))
            # the embedding and output layer: the real rows are drawn, the padding stays zero
            drawn = full[:vocab_size] if name in _VOCAB_ROWS else full
            _init_method(name, config)(drawn, generator=_generator(seed, name))
            param.copy_(tp_shard(full, param, name, model, tp, rank))
