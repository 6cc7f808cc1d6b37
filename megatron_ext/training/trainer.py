"""The training loop: megatron's pipeline schedules drive forward/backward over micro-batches,
megatron's optimizer steps, and the logging rank prints and records what happened."""
from __future__ import annotations

import functools
import math
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megatron_ext.config.schema import Config
from megatron_ext.data.dataset import TokenRows, build_rows
from megatron_ext.data.sampler import GlobalBatchSampler
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.logging.wandb_logger import build_logger
from megatron_ext.models.gpt import build_model
from megatron_ext.training.metrics import MetricsWriter, progress_line, sum_to_all
from megatron_ext.training.optimizer import build_optimizer, build_scheduler
from parallel.topology import Topology


def _lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the masked per-token losses and their count: megatron's per-token-loss mode then
    divides the gradients by the token count of the whole global batch, whatever the layout."""
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    count = loss_mask.sum()
    return loss_sum, count.to(torch.int), {"lm": torch.stack([loss_sum.detach().clone(),
                                                              count.detach().clone()])}


def _eval_stats(batch: Dict[str, torch.Tensor], vocab_size: int, logits: torch.Tensor):
    """Held-out loss and greedy exact match. A row counts as solved when the argmax at every
    response position is the reference token: exactly when greedy decoding from the prompt
    reproduces the whole reference solution."""
    full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
    mask, labels = batch["loss_mask"], batch["labels"]
    nll = F.cross_entropy(full.reshape(-1, vocab_size), labels.reshape(-1),
                          reduction="none").view_as(mask)
    hit = (full.argmax(-1) == labels) | (mask == 0)
    rows = (mask.sum(1) > 0)
    solved = (hit.all(1) & rows).sum()
    loss_sum = (nll * mask).sum()
    stats = torch.stack([loss_sum, mask.sum(), solved.float(), rows.sum().float()]).detach()
    return loss_sum, mask.sum().to(torch.int), {"eval": stats}


class Trainer:
    def __init__(self, cfg: Config, topo: Topology, run_dir: str):
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
        is_log = topo.is_logging_rank
        self.metrics = MetricsWriter(run_dir, is_log)
        self.logger = build_logger(cfg, run_dir, is_log)
        self._reports_loss = topo.is_last_stage and topo.tp_rank == 0 and topo.cp_rank == 0

    # -- one step -------------------------------------------------------------------------
    def _to_device(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {k: v.to(self.topo.device, non_blocking=True) for k, v in batch.items()}

    def _train_forward(self, data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return out, functools.partial(_lm_loss, batch["loss_mask"])

    def _run_schedule(self, batches: List[Dict], forward_step, forward_only: bool) -> List[Dict]:
        iterators = [iter(batches) for _ in self.model]
        return self.schedule(
            forward_step_func=forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(batches),
            seq_length=self.cfg.train.seq_len,
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
        self.scheduler.step(increment=1)  # the LR of step k is the schedule's value at k
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        self.step += 1
        loss_sum, tokens = sum_to_all([loss_sum, tokens], self._reports_loss)
        elapsed = time.perf_counter() - start
        t = self.cfg.train
        return {"step": self.step, "loss": loss_sum / max(tokens, 1.0), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                "tokens_per_s": t.global_batch_size * t.seq_len / elapsed,
                "loss_tokens": int(tokens), "step_time_s": elapsed}

    # -- evaluation -----------------------------------------------------------------------
    def _eval_forward(self, data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None)
        return logits, functools.partial(_eval_stats, batch, self.vocab_size)

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

    def fit(self) -> Dict:
        t = self.cfg.train
        is_log = self.topo.is_logging_rank
        started, last_eval = time.perf_counter(), None
        while self.step < t.steps:
            rec = self.train_step()
            if self.step % t.log_interval == 0 or self.step == t.steps:
                self._record(rec)
                if is_log:
                    per_step = (time.perf_counter() - started) / self.step
                    print(progress_line(rec, t.steps, per_step * (t.steps - self.step)), flush=True)
            if self.eval_rows is not None and t.eval_interval and self.step % t.eval_interval == 0:
                last_eval = self._log_eval()
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
