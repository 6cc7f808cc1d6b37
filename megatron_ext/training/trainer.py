"""The training loop: megatron's pipeline schedules drive forward/backward over micro-batches,
megatron's optimizer steps, and the logging rank prints and records what happened."""
from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.optimizer import clip_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_ext.config.schema import Config
from megatron_ext.data.dataset import TokenRows, build_rows
from megatron_ext.data.sampler import GlobalBatchSampler
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.logging.nvml import GpuMonitor
from megatron_ext.logging.wandb_logger import build_logger
from megatron_ext.models.gpt import build_model
from megatron_ext.training import checkpoint
from megatron_ext.training.metrics import MetricsWriter, progress_line, sum_to_all
from megatron_ext.training.preemption import REQUEUE_EXIT_CODE, PreemptionFlag
from megatron_ext.training.optimizer import build_optimizer, build_scheduler
from parallel.context import zigzag_split
from parallel.topology import Topology


def _lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the masked per-token losses and their count: megatron's per-token-loss mode then
    divides the gradients by the token count of the whole global batch, whatever the layout."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum()
    return loss_sum, count.to(torch.int), {"lm": torch.stack([loss_sum.detach().clone(),
                                                              count.detach().clone()])}


def _eval_stats(batch: Dict[str, torch.Tensor], vocab_size: int, cp_group, logits: torch.Tensor):
    """Held-out loss and greedy exact match. A row counts as solved when the argmax at every
    response position is the reference token: exactly when greedy decoding from the prompt
    reproduces the whole reference solution."""
    full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
    mask, labels = batch["loss_mask"], batch["labels"]
    nll = F.cross_entropy(full.reshape(-1, vocab_size), labels.reshape(-1),
                          reduction="none").view_as(mask)
    # per row: response tokens in this CP shard, and how many of them greedy gets wrong
    per_row = torch.stack([mask.sum(1), ((full.argmax(-1) != labels).float() * mask).sum(1)])
    if cp_group is not None:  # a row's tokens are spread over the CP ranks
        dist.all_reduce(per_row, group=cp_group)
    rows = per_row[0] > 0
    solved = (rows & (per_row[1] == 0)).sum()
    first = cp_group is None or dist.get_rank(cp_group) == 0  # count rows once
    loss_sum = (nll * mask).sum()
    stats = torch.stack([loss_sum, mask.sum(), solved.float() * first,
                         rows.sum().float() * first]).detach()
    return loss_sum, mask.sum().to(torch.int), {"eval": stats}


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf for too many steps in a row."""


def _guarded_step(optimizer, clip_grad: float, loss_is_finite: bool) -> Tuple[bool, float]:
    """megatron's ChainedOptimizer.step, with the update skipped when the loss or the global
    gradient norm is not finite (a NaN update would poison every weight)."""
    optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    if clip_grad > 0:
        for opt in optimizer.chained_optimizers:
            params = opt.get_parameters()
            if params:
                clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=clip_grad,
                                                        total_norm=grad_norm)
    return optimizer.step_with_ready_grads(), grad_norm


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, run_dir: str):
        self.preemption = PreemptionFlag().install()  # early: USR1 before it would kill us
        self.cfg, self.topo, self.run_dir = cfg, topo, run_dir
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = cfg.model.vocab_size or self.tokenizer.vocab_size
        if self.tokenizer.vocab_size > self.vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but "
                             f"model.vocab_size={self.vocab_size}; raise model.vocab_size or "
                             "set it to 0 to follow the tokenizer")
        self.train_rows: TokenRows = build_rows(cfg, self.tokenizer, "train")
        self.eval_rows = (build_rows(cfg, self.tokenizer, "heldout")
                          if cfg.data.source == "task" or cfg.data.valid_path else None)
        self.model = build_model(cfg, topo, self.vocab_size)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.sampler = GlobalBatchSampler(
            len(self.train_rows), cfg.train.global_batch_size, cfg.train.micro_batch_size,
            topo.dp_rank, topo.dims.dp, cfg.seed)
        self.schedule = get_forward_backward_func()
        self.step = 0
        self.skipped_steps = 0  # non-finite steps skipped in total
        self.bad_in_a_row = 0
        self.ckpt_root = os.path.join(run_dir, "checkpoints")
        self.checkpoints = self._checkpoint_manager()
        is_log = topo.is_logging_rank
        self.metrics = MetricsWriter(run_dir, is_log)
        self.logger = build_logger(cfg, run_dir, is_log)
        # the last stage holds the loss; TP ranks hold copies, CP ranks disjoint tokens
        self._reports_loss = topo.is_last_stage and topo.tp_rank == 0
        self.gpu = GpuMonitor(cfg.logging.nvml_interval, topo.local_rank, run_dir,
                              log=lambda m: print(m, flush=True))

    # -- one step -------------------------------------------------------------------------
    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """This rank's part of a micro-batch on its device: with CP, the zigzag shard of every
        [b, s] tensor (megatron's CP RoPE expects exactly that split)."""
        cp = self.topo.dims.cp
        if cp > 1:
            batch = {k: zigzag_split(v, cp, self.topo.cp_rank, dim=1) for k, v in batch.items()}
        return {k: v.to(self.topo.device, non_blocking=True) for k, v in batch.items()}

    def _train_forward(self, data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return out, functools.partial(_lm_loss, batch["loss_mask"])

    def _run_schedule(self, batches: List[Dict], forward_step, forward_only: bool,
                      model: Optional[List] = None, seq_length: Optional[int] = None
                      ) -> List[Dict]:
        """megatron's schedule over `batches` on `model` (default: the trained chunks) with
        sequences of `seq_length` (default: train.seq_len); RL passes its critic, reference
        and rollout lengths."""
        model = self.model if model is None else model
        iterators = [iter(batches) for _ in model]
        return self.schedule(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=model if len(model) > 1 else model[0],
            num_microbatches=len(batches),
            seq_length=seq_length or self.cfg.train.seq_len,
            micro_batch_size=self.cfg.train.micro_batch_size,
            forward_only=forward_only,
        )

    def forward_backward(self) -> Tuple[float, float]:
        """Gradients of the next global batch into the DDP buffers; returns this rank's
        (loss sum, token count), non-zero on the last pipeline stage only."""
        batches = [self._to_device(self.train_rows.batch(ix)) for ix in self.sampler.next_step()]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self._run_schedule(batches, self._train_forward, forward_only=False)
        if not stats:
            return 0.0, 0.0
        total = torch.stack([s["lm"] for s in stats]).sum(0)
        return float(total[0]), float(total[1])

    def train_step(self, inspect_grads=None) -> Dict:
        """One optimizer step. `inspect_grads()`, when given, runs between backward and the
        optimizer, while the reduced gradients sit in the DDP buffers."""
        start = time.perf_counter()
        loss_sum, tokens = self.forward_backward()
        if inspect_grads is not None:
            inspect_grads()
        loss_sum, tokens = sum_to_all([loss_sum, tokens], self._reports_loss)
        loss = loss_sum / max(tokens, 1.0)
        self.scheduler.step(increment=1)  # the LR of step k is the schedule's value at k
        lr = self.optimizer.param_groups[0]["lr"]
        t = self.cfg.train
        applied, grad_norm = _guarded_step(self.optimizer, t.clip_grad, math.isfinite(loss))
        self.step += 1
        if applied:
            self.bad_in_a_row = 0
        else:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        elapsed = time.perf_counter() - start
        return {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_s": t.global_batch_size * t.seq_len / elapsed,
                "loss_tokens": int(tokens), "step_time_s": elapsed,
                "skipped_steps": self.skipped_steps}

    # -- evaluation -----------------------------------------------------------------------
    def _eval_forward(self, data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None)
        cp_group = self.topo.cp_group if self.topo.dims.cp > 1 else None
        return logits, functools.partial(_eval_stats, batch, self.vocab_size, cp_group)

    def evaluate(self) -> Dict:
        """Held-out loss and greedy exact-match accuracy, split over the DP ranks."""
        rows = self.eval_rows
        mbs, dp, dp_rank = self.cfg.train.micro_batch_size, self.topo.dims.dp, self.topo.dp_rank
        per_round = mbs * dp
        batches = []
        for r in range(math.ceil(len(rows) / per_round)):
            idx = [r * per_round + dp_rank * mbs + j for j in range(mbs)]
            batch = rows.batch([i % len(rows) for i in idx])
            batch["loss_mask"] *= torch.tensor([[float(i < len(rows))] for i in idx])
            batches.append(self._to_device(batch))
        with torch.no_grad():
            stats = self._run_schedule(batches, self._eval_forward, forward_only=True)
        local = torch.stack([s["eval"] for s in stats]).sum(0).tolist() if stats else [0.0] * 4
        loss_sum, tokens, solved, count = sum_to_all(local, self._reports_loss)
        return {"step": self.step, "split": "eval", "loss": loss_sum / max(tokens, 1.0),
                "accuracy": solved / max(count, 1.0), "samples": int(count)}

    # -- the loop -------------------------------------------------------------------------
    def _record(self, rec: Dict) -> None:
        self.metrics.write(rec)
        self.logger.log(rec)

    def _log(self, message: str) -> None:
        if self.topo.is_logging_rank:
            print(message, flush=True)

    def train_state(self) -> Dict:
        """What a checkpoint keeps beside the model and optimizer (JSON-able)."""
        return {"step": self.step, "consumed_samples": self.sampler.consumed_samples,
                "scheduler": self.scheduler.state_dict(), "skipped_steps": self.skipped_steps,
                "run_dir": self.run_dir}

    def load_train_state(self, state: Dict) -> None:
        self.step = state["step"]
        self.sampler.consumed_samples = state["consumed_samples"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.skipped_steps = state["skipped_steps"]

    # the checkpoint manager's view of the trainer (a stateful)
    def state_dict(self) -> Dict:
        return self.train_state()

    def load_state_dict(self, state: Dict) -> None:
        self.load_train_state(state)

    def _checkpoint_manager(self, **extra_parts) -> checkpoint.CheckpointManager:
        model = checkpoint.ModelPart(self.model)
        parts = {"model": model, "optimizer": checkpoint.OptimizerPart(self.optimizer, model),
                 **extra_parts}
        return checkpoint.CheckpointManager(
            self.ckpt_root, self.topo, keep=self.cfg.train.keep_checkpoints, sharded=parts,
            states={"train": self}, log=self._log, async_save=self.cfg.train.async_save,
            shape=checkpoint.model_shape(self.cfg.model, self.vocab_size, self.model))

    def resume(self) -> None:
        path = self.checkpoints.resume_path(self.cfg.train.resume)
        if path is None:
            self.metrics.truncate_after(self.step)  # a restart before the first checkpoint
            return
        self.checkpoints.load(path)
        self.metrics.truncate_after(self.step)
        self._log(f"resumed from {path} at step {self.step} "
                  f"({self.sampler.consumed_samples} samples consumed)")

    def save(self, tag: Optional[str] = None, background: bool = False) -> str:
        """Save now; with background=True and train.async_save a step checkpoint returns once
        the writer process has the state, and is committed (and logged) when it is done.
        Tagged checkpoints (bad-state, best) are always written before this returns."""
        return self.checkpoints.save(self.step, tag=tag, background=background)

    def finish_saves(self, wait: bool = True) -> None:
        """Commit the background saves that are done (all of them, waiting, with `wait`); on
        every rank at the same point, as it synchronises them."""
        self.checkpoints.finish(wait)

    def _stop_for_preemption(self, signum: int, last_save: int) -> None:
        """USR1 (SLURM's warning before preemption or the time limit): save and exit with the
        code the sbatch script requeues on. SIGTERM (scancel, node failure): save and fail."""
        self.finish_saves()
        if last_save != self.step:
            self.save()
        self.logger.finish()
        requeue = signum == signal.SIGUSR1
        self._log(f"stopping at step {self.step} on {signal.Signals(signum).name}"
                  f"{': exiting for requeue' if requeue else ''}")
        dist.barrier(group=dist.group.WORLD)
        raise SystemExit(REQUEUE_EXIT_CODE if requeue else 128 + signum)

    def fit(self) -> Dict:
        t = self.cfg.train
        self.resume()
        first_step, started, last_eval, last_save = self.step, time.perf_counter(), None, self.step
        while self.step < t.steps:
            rec = self.train_step()
            gpu = self.gpu.maybe_sample(self.step)
            if gpu and self.topo.is_logging_rank:
                self.logger.log({"step": self.step, **gpu})
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self._record(rec)
                per_step = (time.perf_counter() - started) / (self.step - first_step)
                self._log(progress_line(rec, t.steps, per_step * (t.steps - self.step)))
            if self.bad_in_a_row:
                self._log(f"step {self.step}: loss {rec['loss']} / grad-norm {rec['grad_norm']} "
                          f"is not finite; update skipped ({self.bad_in_a_row} in a row)")
                if self.bad_in_a_row >= t.max_bad_steps:
                    path = self.save(tag="bad-state")
                    raise NonFiniteLossError(
                        f"loss or grad norm was NaN/Inf for {self.bad_in_a_row} steps in a row, "
                        f"up to step {self.step}; the state is saved in {path} for inspection. "
                        "Lower train.lr, check the data, or resume from the last good "
                        "checkpoint")
            self.finish_saves(wait=False)
            if t.save_interval and self.step % t.save_interval == 0:
                self.save(background=True)
                last_save = self.step
            signum = self.preemption.signal_anywhere(dist.group.WORLD)
            if signum:
                self._stop_for_preemption(signum, last_save)
            if self.eval_rows is not None and t.eval_interval and self.step % t.eval_interval == 0:
                last_eval = self._log_eval()
        if t.save_interval and last_save != self.step:
            self.save()
        self.finish_saves()
        if self.eval_rows is not None and (last_eval is None or last_eval["step"] != self.step):
            last_eval = self._log_eval()
        self.logger.finish()
        return last_eval or {}

    def _log_eval(self) -> Dict:
        rec = self.evaluate()
        self._record(rec)
        if self.topo.is_logging_rank:
            print(f"eval  step {rec['step']:>5} | held-out loss {rec['loss']:.4f} | held-out "
                  f"accuracy {rec['accuracy']:.1%} ({rec['samples']} problems, greedy exact "
                  "match)", flush=True)
        return rec
