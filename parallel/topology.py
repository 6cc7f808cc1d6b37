"""The process-group topology: TP, PP (optionally virtual), CP and DP, built once through
megatron.core.parallel_state and handed down. This module and launch/ are the only places that
read the torchrun/SLURM environment."""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_ext.config.layout import LayoutError, ParallelDims


@dataclasses.dataclass(frozen=True)
class Topology:
    """Rank coordinates and process groups of this process."""

    dims: ParallelDims
    rank: int
    local_rank: int
    device: torch.device
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int

    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state as ps
        return ps.get_context_parallel_group()

    @property
    def dp_group(self):
        """Data-parallel group without CP (samples differ across it)."""
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group()

    @property
    def dp_cp_group(self):
        """Gradients are reduced over DP x CP: CP ranks hold parts of the same samples."""
        from megatron.core import parallel_state as ps
        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """Global rank 0 prints and writes the run directory."""
        return self.rank == 0

    def last_stage_rank(self) -> int:
        """Global rank of the last PP stage in this rank's pipeline (it holds the loss)."""
        from megatron.core import parallel_state as ps
        return ps.get_pipeline_model_parallel_last_rank()


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) of this process, from the first that applies:

    - torchrun/`launch local` variables (RANK, LOCAL_RANK, WORLD_SIZE). They win because every
      worker that torchrun starts inside a SLURM task sees that task's SLURM_PROCID.
    - an srun step (SLURM_STEP_ID set): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS. The batch
      shell also carries SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but a python started
      there directly is a single process, hence the step check.
    - otherwise one process.
    """
    env = os.environ
    if "RANK" in env:
        rank = int(env["RANK"])
        return rank, int(env.get("LOCAL_RANK", rank)), int(env.get("WORLD_SIZE", 1))
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"])
    return 0, 0, 1


def initialize(dims: ParallelDims, *, seed: int, timeout_s: int = 600) -> Topology:
    """Create the default process group (NCCL on GPUs, gloo on CPUs) and megatron's groups."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    rank, local_rank, world_size = env_world()
    if dist.is_initialized():  # a caller (a test harness, say) made the default group
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world_size != dims.world_size:
        raise LayoutError(f"WORLD_SIZE={world_size} but the layout was validated for "
                          f"{dims.world_size} processes")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        backend, device = "nccl", torch.device("cuda", torch.cuda.current_device())
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1 and "MASTER_PORT" not in os.environ:
            # one process needs no rendezvous: an in-process store, so that two single-process
            # runs on one machine do not fight over a port
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp,
        context_parallel_size=dims.cp,
        # megatron builds its TP/PP/DP groups with timedelta(minutes=this): the exact seconds,
        # so a collective on any group gives up after parallel.timeout_s, not a rounded value
        distributed_timeout_minutes=timeout_s / 60,
    )
    model_parallel_cuda_manual_seed(seed)
    return Topology(
        dims=dims, rank=rank, local_rank=local_rank, device=device,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}-{a}" if a > start else f"{a}")
            start = b
    return ",".join(out)


def placement(topo: Topology) -> str:
    """Which host each rank runs on, by PP stage, and whether every TP group stays inside one
    host (the launcher's placement decides that; a TP group across hosts would still run, only
    slowly). One all_gather_object over the world, on every rank; one line for rank 0 to log."""
    tp = tuple(dist.get_process_group_ranks(topo.tp_group)) if dist.is_initialized() else (0,)
    mine = (socket.gethostname(), topo.pp_rank, tp)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)  # torch puts it on the group's device
    hosts: dict[str, list[int]] = {}
    for rank, (host, _pp, _tp) in enumerate(everyone):
        hosts.setdefault(host, []).append(rank)
    parts = []
    for host, ranks in hosts.items():
        stages = sorted({everyone[r][1] for r in ranks})
        parts.append(f"{host} ranks {_spans(ranks)} (pp stage {_spans(stages)})")
    tp_local = all(len({everyone[r][0] for r in tp}) == 1 for _h, _p, tp in everyone)
    return (f"placement: {', '.join(parts)}; tp groups "
            f"{'inside one host each' if tp_local else 'ACROSS hosts'}")


def destroy() -> None:
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
