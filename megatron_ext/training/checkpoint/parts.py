"""The sharded parts of a checkpoint: what the manager hands to one dist_checkpointing save and
load. A part is any object with

    sharded_state_dict(is_loading: bool) -> dict   # megatron ShardedTensor/ShardedObject tree
    load_sharded_state_dict(loaded: dict) -> None  # that tree as loaded, tensors in place

ModelPart (megatron model chunks) and OptimizerPart (megatron's optimizer over such a model)
are the two every recipe needs. Sharded keys are global (layer numbers, TP/PP offsets), so any
layout loads any other; a key prefix keeps a second model (the PPO critic) apart from the first
in the same save."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_ext.compat.optimizer_state import fill_fresh_adam_state, load_optimizer_state
from megatron_ext.training.checkpoint.errors import CheckpointError

# Shape keys a checkpoint must share with the model that loads it, beside the vocab.
SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
              "kv_channels", "ffn_hidden_size", "tie_embeddings")
# Recorded but free to differ: the padded vocab follows parallel.tp, and a load drops or adds
# the padding rows (zero_vocab_padding).
PADDED_VOCAB = "padded_vocab_size"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def model_shape(model_cfg, vocab_size: int, chunks: Sequence) -> Dict:
    """The shape a checkpoint records: the config's shape keys, the tokenizer's vocab and the
    model's padded vocab."""
    return ({k: getattr(model_cfg, k) for k in SHAPE_KEYS} |
            {"vocab_size": vocab_size, PADDED_VOCAB: _unwrap(chunks[0]).vocab_size})


class ModelPart:
    """megatron model chunks (DDP-wrapped or not; one per virtual pipeline stage).

    `prefix` goes before every sharded key (megatron's sharded_state_dict(prefix=)), so two
    models share a save; `skip(key)` leaves keys out (key without the prefix), e.g. loading an
    SFT trunk into the critic without its value head."""

    def __init__(self, chunks: Sequence, prefix: str = "",
                 skip: Optional[Callable[[str], bool]] = None):
        self.chunks = [_unwrap(c) for c in chunks]
        self.prefix, self.skip = prefix, skip

    def model_sharded_state_dict(self) -> Dict:
        """Every chunk's full sharded state (what an optimizer maps its state onto)."""
        return {i: c.sharded_state_dict(prefix=self.prefix) for i, c in enumerate(self.chunks)}

    def sharded_state_dict(self, is_loading: bool) -> Dict:
        full = self.model_sharded_state_dict()
        if self.skip is None:
            return full
        n = len(self.prefix)
        return {i: {k: v for k, v in state.items() if not self.skip(k[n:])}
                for i, state in full.items()}

    def load_sharded_state_dict(self, loaded: Dict) -> None:
        n = len(self.prefix)
        for i, chunk in enumerate(self.chunks):
            state = {k[n:]: v for k, v in loaded[i].items()}
            missing, unexpected = chunk.load_state_dict(state, strict=False)
            missing = [k for k in missing if not (self.skip and self.skip(k))
                       and not k.endswith("_extra_state")]
            if missing or unexpected:
                raise CheckpointError(
                    f"parameters missing {missing[:5]}, unexpected {list(unexpected)[:5]}: the "
                    "checkpoint holds another model")


class OptimizerPart:
    """megatron's optimizer (ChainedOptimizer, DistributedOptimizer) over a ModelPart's chunks,
    in the fully reshardable format (any TP/PP/DP loads it)."""

    def __init__(self, optimizer, model_part: ModelPart):
        self.optimizer, self.model_part = optimizer, model_part

    def sharded_state_dict(self, is_loading: bool) -> Dict:
        fill_fresh_adam_state(self.optimizer)  # a checkpoint always holds Adam state
        return self.optimizer.sharded_state_dict(
            self.model_part.model_sharded_state_dict(), is_loading=is_loading,
            metadata=_OPTIM_METADATA)

    def load_sharded_state_dict(self, loaded: Dict) -> None:
        load_optimizer_state(self.optimizer, loaded)  # megatron's load_state_dict, mended


def zero_vocab_padding(sharded, loaded, vocab_size: int) -> None:
    """Zero the rows at and past `vocab_size` of every vocab-sized tensor in `loaded` (the tree
    `sharded` gave, as loaded). megatron marks the embedding and output layer (and so the
    optimizer states mapped onto them) allow_shape_mismatch: a checkpoint of another padded
    vocab loads its overlapping rows and leaves the added ones zero; this makes the padding
    rows zero whichever checkpoint rows they came from, weights and Adam moments alike."""
    if isinstance(sharded, ShardedTensor):
        if sharded.allow_shape_mismatch:
            first = sharded.global_offset[sharded.prepend_axis_num]
            loaded[max(vocab_size - first, 0):].zero_()
    elif isinstance(sharded, dict):
        for key, value in sharded.items():
            if key in loaded:
                zero_vocab_padding(value, loaded[key], vocab_size)
    elif isinstance(sharded, list):
        for value, got in zip(sharded, loaded):
            zero_vocab_padding(value, got, vocab_size)
