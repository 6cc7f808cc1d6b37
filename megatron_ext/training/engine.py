"""The engine every recipe shares: a ModelUnit is one network (megatron chunks, and for a trained
one its optimizer and LR schedule) that runs megatron's pipeline schedule over micro-batches.

SFT is `policy.train_on(batches, lm_loss, LM_METRICS)`; RL is `policy.train_on(mb,
policy_objective, ...)`, `critic.train_on(mb, value_objective, ...)` and
`reference.forward_only(mb, logprob_output)`. A loss function has megatron's per-token-loss
signature `fn(batch, output) -> (loss_sum, token_count, {metric: scalar tensor})`; megatron
divides the gradients by the count summed over all micro-batches and DP ranks, so an update is
the same on every layout. Metrics come back reduced over the whole job by the one collective
helper, named by a table of `Metric` specs that the objective declares.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext.models.attention import packed_attention_mask
from megatron_ext.training import collectives
from megatron_ext.training.optimizer import build_optimizer, build_scheduler
from parallel.context import zigzag_split
from parallel.topology import Topology

Batch = Dict[str, torch.Tensor]
LossFn = Callable[[Batch, torch.Tensor], tuple]


@dataclasses.dataclass(frozen=True)
class Metric:
    """One statistic a loss or output function reports per micro-batch, and how the job
    combines it: "sum" (summed over micro-batches and ranks) or "max"."""

    name: str
    reduce: str = "sum"


def metrics(*names: str, reduce: str = "sum") -> tuple:
    return tuple(Metric(n, reduce) for n in names)


@dataclasses.dataclass
class StepResult:
    """What one optimizer step did, reduced over the job."""

    values: Dict[str, float]  # every declared metric, summed or maxed over the job
    grad_norm: float
    applied: bool  # False: the loss or the grad norm was not finite and the update was skipped

    @property
    def loss(self) -> float:
        return self.values["loss"] / max(self.values["count"], 1.0)


class ModelUnit:
    """Model chunks (one per virtual pipeline stage, DDP-wrapped when trained), with the
    optimizer and LR schedule that train them (None for a frozen network)."""

    def __init__(self, name: str, chunks: List, topo: Topology, *, micro_batch_size: int,
                 seq_length: int, optimizer=None, scheduler=None, clip_grad: float = 0.0):
        self.name, self.chunks, self.topo = name, chunks, topo
        self.optimizer, self.scheduler, self.clip_grad = optimizer, scheduler, clip_grad
        self.micro_batch_size, self.seq_length = micro_batch_size, seq_length
        self._schedule = get_forward_backward_func()
        # the last stage computes the losses; TP ranks hold copies of them, CP ranks and DP
        # replicas disjoint tokens: so these ranks, and only these, contribute to a metric
        self.reports = topo.is_last_stage and topo.tp_rank == 0

    @property
    def device(self) -> torch.device:
        return self.topo.device

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def place(self, batch: Batch) -> Batch:
        """This rank's part of a `[b, s]` micro-batch on its device: with CP, the zigzag shard
        of every tensor (megatron's CP RoPE expects exactly that split) but the document ids,
        which stay whole (ring attention masks every block pair from the whole row's)."""
        cp = self.topo.dims.cp
        if cp > 1:
            batch = {k: v if k == "document_ids" else zigzag_split(v, cp, self.topo.cp_rank, dim=1)
                     for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def modules(self) -> List:
        """The unwrapped megatron modules (GPTModel chunks)."""
        return [getattr(c, "module", c) for c in self.chunks]

    # -- running the schedule --------------------------------------------------------------
    def forward_step(self, output_fn: Callable, labels: bool = False) -> Callable:
        """megatron's forward_step_func: the next micro-batch through a chunk, and
        `output_fn(batch, output)` to run on the last stage. With `labels` the model computes
        the per-token loss itself (our fused linear cross-entropy)."""

        def step(data_iterator, model):
            batch = next(data_iterator)
            docs = batch.get("document_ids")  # packed documents attend only within themselves
            out = model(batch["tokens"], batch["position_ids"],
                        None if docs is None else packed_attention_mask(docs, self.topo.dims.cp),
                        labels=batch["labels"] if labels else None)
            return out, functools.partial(output_fn, batch)

        return step

    def _run(self, batches: Sequence[Batch], step: Callable, forward_only: bool,
             seq_length: Optional[int]) -> List[Dict]:
        iterators = [iter(batches) for _ in self.chunks]
        return self._schedule(
            forward_step_func=step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_length or self.seq_length,
            micro_batch_size=self.micro_batch_size,
            forward_only=forward_only,
        )

    def forward_only(self, batches: Sequence[Batch], output_fn: Callable, *,
                     labels: bool = False, seq_length: Optional[int] = None) -> List[Dict]:
        """`output_fn`'s per-micro-batch dicts (the last stage's; [] on the other stages)."""
        with torch.no_grad():
            return self._run(batches, self.forward_step(output_fn, labels), True, seq_length)

    def reduce(self, outputs: List[Dict], specs: Sequence[Metric]) -> Dict[str, float]:
        """Each metric of `specs` over the micro-batch outputs and the whole job, in one
        collective per kind of reduction (one host sync)."""
        values: Dict[str, float] = {}
        for kind, combine in (("sum", torch.sum), ("max", torch.amax)):
            names = [s.name for s in specs if s.reduce == kind]
            if not names:
                continue
            if outputs:
                local = torch.stack([torch.stack([o[n].detach().double() for n in names])
                                     for o in outputs])
                local = combine(local, dim=0)
            else:
                local = torch.zeros(len(names), dtype=torch.float64, device=self.device)
            if not self.reports:
                local = torch.zeros_like(local)
            values.update(zip(names, collectives.all_reduce(local, None, kind).tolist()))
        return values

    # -- training ----------------------------------------------------------------------------
    def train_on(self, batches: Sequence[Batch], loss_fn: LossFn, specs: Sequence[Metric], *,
                 labels: bool = False, seq_length: Optional[int] = None,
                 inspect_grads: Optional[Callable[[], None]] = None) -> StepResult:
        """One optimizer step on `batches`: zero the gradients, forward/backward through the
        schedule, reduce the metrics (`loss` and `count` among them), and step unless the loss
        or the gradient norm is not finite. `inspect_grads()` runs between backward and the
        step, while the reduced gradients sit in the DDP buffers."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(batches, self.forward_step(loss_fn, labels), False, seq_length)
        if inspect_grads is not None:
            inspect_grads()
        values = self.reduce(outputs, specs)
        applied, grad_norm = self._guarded_step(
            math.isfinite(values["loss"] / max(values["count"], 1.0)))
        return StepResult(values, grad_norm, applied)

    def _guarded_step(self, loss_is_finite: bool):
        """megatron's ChainedOptimizer.step, with the update skipped when the loss or the global
        gradient norm is not finite (a NaN update would poison every weight)."""
        optimizer = self.optimizer
        optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if not (loss_is_finite and math.isfinite(grad_norm)):
            return False, grad_norm
        if self.clip_grad > 0:
            for opt in optimizer.chained_optimizers:
                params = opt.get_parameters()
                if params:
                    clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=self.clip_grad,
                                                            total_norm=grad_norm)
        return optimizer.step_with_ready_grads(), grad_norm

    def scale_lr(self, scale: float, lr: float, min_lr: float) -> None:
        """Scale the schedule's peak and final LR (it reads them from the param groups at every
        step): the regression guard's halvings."""
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = lr * scale, min_lr * scale

    def freeze(self) -> "ModelUnit":
        for chunk in self.chunks:
            chunk.eval().requires_grad_(False)
        return self


def trained_unit(name: str, cfg, topo: Topology, chunks: List) -> ModelUnit:
    """A unit with megatron's optimizer and LR schedule over DDP-wrapped `chunks`, as `cfg`'s
    train section sets them."""
    optimizer = build_optimizer(cfg, chunks)
    return ModelUnit(name, chunks, topo, micro_batch_size=cfg.train.micro_batch_size,
                     seq_length=cfg.train.seq_len, optimizer=optimizer,
                     scheduler=build_scheduler(cfg, optimizer), clip_grad=cfg.train.clip_grad)
