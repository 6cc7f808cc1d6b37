"""Pretraining and SFT: next-token loss on the masked tokens of packed rows, one optimizer step
per global batch, teacher-forced held-out loss and exact match as the eval."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from megatron_ext.data.dataset import build_sources, summary
from megatron_ext.data.sampler import GlobalBatchSampler
from megatron_ext.convert.hf_load import load_hf_weights
from megatron_ext.convert.origin import ModelOrigin
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.models.gpt import build_model, model_vocab_size
from megatron_ext.training.checkpoint import model_shape
from megatron_ext.training.engine import metrics, trained_unit
from megatron_ext.training.heldout import heldout_lm

LM_METRICS = metrics("loss", "count")


def lm_loss(batch: Dict[str, torch.Tensor], per_token_loss: torch.Tensor):
    """Sum of the masked per-token losses and their count: megatron's per-token-loss mode then
    divides the gradients by the token count of the whole global batch, whatever the layout."""
    mask = batch["loss_mask"]
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"loss": loss_sum.detach().clone(),
                                           "count": count.detach().clone()}


class SFTRecipe:
    eval_at_start = False

    def __init__(self, cfg, topo, log: Callable[[str], None]):
        self.cfg, self.topo, self.log = cfg, topo, log
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = model_vocab_size(cfg, self.tokenizer)
        self.train_rows, self.eval_rows = build_sources(cfg, topo, self.tokenizer)
        log(summary(self.train_rows))
        # model=hf: start() loads the HF weights (or a resume the checkpoint's); none drawn
        model = build_model(cfg, topo, self.vocab_size, init=not cfg.model.hf_path)
        self.policy = trained_unit("model", cfg, topo, model)
        self.units = {"model": self.policy}
        self.shape = model_shape(cfg.model, self.vocab_size, self.policy.chunks)
        t = cfg.train
        self.sampler = GlobalBatchSampler(len(self.train_rows), t.global_batch_size,
                                          t.micro_batch_size, topo.dp_rank, topo.dims.dp, cfg.seed)
        self.eval_interval, self.eval_hooks = t.eval_interval, []

    def states(self) -> Dict:
        return {"data": self.sampler, "schedule": self.policy.scheduler,
                "origin": ModelOrigin(self.cfg)}

    def start(self, resumed: bool, checkpoints) -> None:
        """The weights are the resumed checkpoint's, else model.hf_path's (model=hf), else
        the seed's."""
        if not resumed and self.cfg.model.hf_path:
            load_hf_weights(self.policy.chunks, self.cfg.model.hf_path, self.topo, self.vocab_size)
            self.policy.optimizer.reload_model_params()
            self.log(f"model initialised from {self.cfg.model.hf_path}")

    def train_step(self, step: int, inspect_grads=None) -> Dict:
        """One optimizer step on the next global batch. `inspect_grads()` runs between
        backward and the update (tests read the reduced gradients there)."""
        t = self.cfg.train
        batches = [self.policy.place(self.train_rows.batch(ix)) for ix in self.sampler.next_step()]
        self.policy.scheduler.step(increment=1)  # the LR of step k is the schedule's value at k
        result = self.policy.train_on(batches, lm_loss, LM_METRICS, labels=True,
                                      inspect_grads=inspect_grads)
        return {"loss": result.loss, "lr": self.policy.lr, "grad_norm": result.grad_norm,
                "applied": result.applied, "loss_tokens": int(result.values["count"]),
                "tokens": t.global_batch_size * t.seq_len}

    def progress(self, record: Dict) -> str:
        return ""

    def evaluate(self, step: int) -> Optional[Dict]:
        if self.eval_rows is None:
            return None
        lm = heldout_lm(self.policy, self.eval_rows, self.vocab_size)
        rec = {"step": step, "split": "eval", "loss": lm["loss"], "accuracy": lm["exact_match"],
               "samples": lm["samples"]}
        self.log(f"eval  step {step:>5} | held-out loss {rec['loss']:.4f} | held-out accuracy "
                 f"{rec['accuracy']:.1%} ({rec['samples']} problems, greedy exact match)")
        return rec
