"""Runs HF models (tests/hf_tiny.py) in several TP/PP/VPP layouts and saves, per layout, the
logits of a batch (gathered over TP, padding cut) and the training loss of the same tokens."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

LAYOUTS = {"tp1": [], "tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"],
           "tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
           "pp2vpp2": ["parallel.pp=2", "parallel.vpp=2"]}
BATCH, SEQ = 2, 16


def _logits(batch, logits):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    full = gather_from_tensor_model_parallel_region(logits)
    zero = full.sum() * 0
    return zero, torch.tensor(1, dtype=torch.int), {"logits": full.detach().clone()}


def _loss(batch, per_token):
    mask = batch["loss_mask"]
    total = (per_token.float() * mask).sum()
    return total, mask.sum().to(torch.int), {"sum": total.detach(), "count": mask.sum().detach()}


def run_models(rank: int, world_size: int, out_dir: str, models: dict, layouts: list) -> None:
    """models: name -> HF dir. Saves <out_dir>/<name>-<layout>.pt on the last stage's TP rank
    0 of DP rank 0: {"logits": [b, s, vocab], "loss": mean training loss}."""
    from megatron.core import parallel_state as ps

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    from tests.hf_tiny import VOCAB, tokens

    compat.setup()
    from megatron_ext.convert.hf_load import load_hf_weights
    from megatron_ext.models.gpt import build_gpt_chunks
    from megatron_ext.training.engine import ModelUnit

    ids = tokens(BATCH, SEQ + 1)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:],
             "position_ids": torch.arange(SEQ).expand(BATCH, -1),
             "loss_mask": torch.ones(BATCH, SEQ)}
    for name, hf_dir in models.items():
        for layout in layouts:
            cfg = compose_config(["logging=none", "model=hf", f"model.hf_path={hf_dir}",
                                  f"train.seq_len={SEQ}", f"train.micro_batch_size={BATCH // 2}",
                                  "train.global_batch_size=4"] + LAYOUTS[layout])
            dims = validate(cfg, world_size)
            topo = topology.initialize(dims, seed=cfg.seed)
            chunks = build_gpt_chunks(cfg, topo, VOCAB)
            load_hf_weights(chunks, hf_dir, topo, VOCAB)
            unit = ModelUnit("m", chunks, topo, micro_batch_size=BATCH // 2, seq_length=SEQ)
            halves = [unit.place({k: v[i:i + 1] for k, v in batch.items()}) for i in range(BATCH)]
            logits = unit.forward_only(halves, _logits)
            losses = unit.forward_only(halves, _loss, labels=True)
            if topo.is_last_stage and topo.tp_rank == 0 and topo.dp_rank == 0:
                full = torch.cat([o["logits"] for o in logits])[..., :VOCAB]
                loss = sum(o["sum"] for o in losses) / sum(o["count"] for o in losses)
                torch.save({"logits": full.cpu(), "loss": float(loss)},
                           os.path.join(out_dir, f"{name}-{layout}.pt"))
            ps.destroy_model_parallel()
            dist.barrier()
