"""Model weights (only) from a training checkpoint: how an RL run takes over its SFT run's policy,
and how the reference model and the critic get their starting weights.

The checkpoint is read through megatron dist_checkpointing, so the SFT run's layout does not
matter (TP/PP/DP are resharded); its optimizer state, step and LR schedule are left behind."""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from megatron_ext.training import checkpoint


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def checked_source(path: str, shape: dict, rank: int) -> None:
    """Raise CheckpointError unless `path` is a complete checkpoint of a model of this `shape`.
    Rank 0 reads the files (checksums) and every rank gets its verdict."""
    verdict = [None]
    if rank == 0:
        problem = checkpoint.verify(path)
        if problem is None:
            saved = json.load(open(os.path.join(path, checkpoint.TRAIN_STATE)))["shape"]
            diff = {k: (saved.get(k), v) for k, v in shape.items() if saved.get(k) != v}
            if diff:
                problem = (f"it holds another model shape: (checkpoint, config) = {diff}; use "
                           "the model config of the SFT run")
        verdict[0] = problem
    dist.broadcast_object_list(verdict, src=0, group=dist.group.WORLD)
    if verdict[0] is not None:
        raise checkpoint.CheckpointError(f"rl.init_checkpoint={path!r} is unusable: "
                                         f"{verdict[0]}")


def model_shape(cfg, vocab_size: int) -> dict:
    """The shape keys a checkpoint records that its weights must match. The padded vocab may
    differ (it follows parallel.tp): megatron loads embedding and output rows across paddings,
    and the padding rows never reach a softmax."""
    return {k: getattr(cfg.model, k) for k in checkpoint.SHAPE_KEYS} | {"vocab_size": vocab_size}


def load_weights(chunks: Sequence, path: str, skip: Optional[Callable[[str], bool]] = None) -> None:
    """Load this rank's shards of the model weights saved in `path` into `chunks` (any layout).
    `skip(key)` leaves parameters out, e.g. a critic's value head that the SFT model lacks."""
    from megatron.core import dist_checkpointing
    inner = [_unwrap(c) for c in chunks]
    names = ["model"] if len(inner) == 1 else [f"model{i}" for i in range(len(inner))]
    wanted = {}
    for name, chunk in zip(names, inner):
        state = chunk.sharded_state_dict()
        wanted[name] = {k: v for k, v in state.items() if skip is None or not skip(k)}
    loaded = dist_checkpointing.load(wanted, path)
    for name, chunk in zip(names, inner):
        missing, unexpected = chunk.load_state_dict(loaded[name], strict=skip is None)
        missing = [k for k in missing if not (skip and skip(k)) and not k.endswith("_extra_state")]
        if missing or unexpected:
            raise checkpoint.CheckpointError(
                f"loading {path}: parameters missing {missing[:5]}, unexpected "
                f"{list(unexpected)[:5]}; the checkpoint is from another model")
