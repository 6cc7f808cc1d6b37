"""Runs layouts of the tiny GPT from the same initial weights and records, per optimizer step,
the loss, the full gradients (gathered from the shards) and the full weights."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

# The model and batch of every parity run: 4 layers (pp*vpp divides it), a vocab of 512 so the
# padded embedding is the same for tp 1, 2 and 4, and a global batch every layout can split.
# Adam divides each gradient by its own magnitude: with eps=1e-8 a 1e-8 gradient that differs
# in its 8th digit between summation orders moves its weight by ~1e-4*lr. eps=1e-5 keeps the
# weight comparison about the layout, not about Adam's amplification of rounding.
# Attention is megatron's local DotProductAttention (at CP > 1 the ring with its PyTorch block
# kernel) unless a layout overrides model.attention_backend.
BASE = ["logging=none", "model=tiny", "model.vocab_size=512", "train.seq_len=32",
        "train.micro_batch_size=2", "train.global_batch_size=8", "train.steps=3",
        "train.warmup_steps=1", "train.lr=1e-2", "train.adam_eps=1e-5", "data.num_samples=256",
        "seed=7", "model.attention_backend=local"]
STEPS = 3


def run_layouts(rank: int, world_size: int, out_dir: str, layouts: dict) -> None:
    """For each named layout (a list of overrides): build, load init.pt (or write it from the
    first layout when absent), train STEPS steps, save <name>.pt on rank 0."""
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.reshard import gather_full_state, load_full_state
    from parallel import topology

    compat.setup()
    from megatron_ext.train import build_loop

    init_path = os.path.join(out_dir, "init.pt")
    for name, overrides in layouts.items():
        cfg = compose_config(BASE + list(overrides) + [f"run.dir={out_dir}/{name}"])
        dims = validate(cfg, world_size)
        topo = topology.initialize(dims, seed=cfg.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)
        recipe = build_loop(cfg, topo, cfg.run.dir).recipe
        chunks = recipe.policy.chunks
        if os.path.exists(init_path):
            load_full_state(chunks, torch.load(init_path, weights_only=True), topo)
        else:
            full = gather_full_state(chunks, topo)
            if rank == 0:
                torch.save(full, init_path)
            dist.barrier()
        chunk = chunks[0].module
        record = {"loss": [], "grads": [], "weights": [], "model_class": type(chunk).__name__,
                  "swiglu_modules": sum(type(m).__name__ == "SwiGLUActivation"
                                        for m in chunk.modules())}
        for step in range(1, STEPS + 1):
            grads = []
            if not cfg.parallel.use_distributed_optimizer:  # else grads are reduce-scattered
                inspect = lambda: grads.append(gather_full_state(chunks, topo, grads=True))
            else:
                inspect = None
            record["loss"].append(recipe.train_step(step, inspect_grads=inspect)["loss"])
            record["grads"].append(grads[0] if grads else None)
            record["weights"].append(gather_full_state(chunks, topo))
        if rank == 0:
            torch.save(record, os.path.join(out_dir, f"{name}.pt"))
        from megatron.core import parallel_state as ps
        ps.destroy_model_parallel()
        dist.barrier()
