"""The RL fine-tuning loop (GRPO, PPO) on the SFT Trainer's model, optimizer, LR schedule,
checkpoints, preemption, metrics and W&B.

One RL step: draw prompts (weighted by their pass-rate history), sample `group_size` responses
each with the policy itself (same weights, same TP/PP layout: there is nothing to sync), score
them, keep the groups inside the difficulty band (refilling the batch), compute advantages (GRPO:
group baseline; PPO: critic + GAE), the reference log-probs when the KL is on, and then run
`ppo_epochs x mini_batches` policy updates over the trajectory buffer through megatron's
forward/backward schedule in per-token-loss mode. The policy starts from an SFT checkpoint's
weights (`rl.init_checkpoint`); the RL run's own checkpoints resume it exactly like SFT.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import time
import zlib
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_ext.data.task import ArithmeticTask
from megatron_ext.models.gpt import build_gpt_chunks
from megatron_ext.rl.advantages import gae, grpo_advantages, whiten
from megatron_ext.rl.buffer import TrajectoryBuffer
from megatron_ext.models.critic import HEAD, build_critic
from megatron_ext.rl.evaluation import heldout_accuracy
from megatron_ext.rl.experience import PromptPool, collect, rollout_stats
from megatron_ext.rl.filtering import PassRateHistory
from megatron_ext.rl.guard import RegressionGuard
from megatron_ext.rl.losses import kl_penalty
from megatron_ext.rl.objective import (POLICY_MAXES, POLICY_SUMS, VALUE_SUMS, PolicySettings,
                                       logprob_output, policy_objective, value_objective,
                                       value_output)
from megatron_ext.rl.rewards import CombinedReward
from megatron_ext.models.generate import SamplingParams
from megatron_ext.rl.rows import Rows, last_token_rewards, micro_batches, rows_from_groups
from megatron_ext.training import checkpoint
from megatron_ext.training.metrics import sum_to_all
from megatron_ext.training.trainer import Trainer, _guarded_step


def _max_to_all(values: List[float], contribute: bool) -> List[float]:
    """Max of non-negative statistics over the whole job (last-stage values to rank 0)."""
    t = torch.tensor(values if contribute else [0.0] * len(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
    return t.tolist()


class _GuardStop(Exception):
    """The regression guard ended the run (rl.action=stop)."""


class RLTrainer(Trainer):
    def __init__(self, cfg, topo, run_dir):
        super().__init__(cfg, topo, run_dir)
        rl = self.rl = cfg.rl
        t = cfg.data.task
        task = ArithmeticTask(t.seed, t.min_ops, t.max_ops, t.max_operand)
        self.pool = PromptPool(task.take(cfg.data.num_samples, "train"), self.tokenizer)
        self.heldout = PromptPool(task.take(cfg.train.eval_samples, "heldout"), self.tokenizer)
        self.reward = CombinedReward(rl.rewards)
        self.history = PassRateHistory(rl.band_low, rl.band_high)
        self.buffer = TrajectoryBuffer(epochs=rl.ppo_epochs, mini_batches=rl.mini_batches,
                                       max_staleness=rl.max_staleness, seed=cfg.seed)
        self.params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, tuple(rl.stop))
        self.settings = PolicySettings(
            vocab_size=self.vocab_size, temperature=rl.temperature or 1.0, eps_low=rl.eps_low,
            eps_high=rl.eps_high, dual_clip=rl.dual_clip or None, agg=rl.loss_agg,
            entropy_coef=rl.entropy_coef,
            kl_coef=rl.kl_coef if rl.kl_mode == "loss" else 0.0, kl_estimator=rl.kl_estimator)
        # the frozen reference policy: only when the KL is on (kl_coef=0 skips its forward)
        self.reference = None
        if rl.kl_coef > 0:
            self.reference = build_gpt_chunks(cfg, topo, self.vocab_size)
            for chunk in self.reference:
                chunk.eval().requires_grad_(False)
        self.critic = self.critic_optimizer = None
        if rl.algorithm == "ppo":
            self.critic, self.critic_optimizer = build_critic(cfg, topo, self.vocab_size)
            critic = checkpoint.ModelPart(self.critic, prefix="critic.")
            self.checkpoints = self._checkpoint_manager(  # one save holds policy and critic
                critic=critic,
                critic_optimizer=checkpoint.OptimizerPart(self.critic_optimizer, critic))
        self.guard = RegressionGuard(rl.margin, rl.action)
        self.version = 0  # policy updates so far: the buffer's policy version
        self._last_eval: Optional[Dict] = None

    # -- state ---------------------------------------------------------------------------
    def train_state(self) -> Dict:
        state = super().train_state()
        state["rl"] = {"version": self.version, "history": self.history.state_dict(),
                       "buffer_iteration": self.buffer.iteration,
                       "guard": self.guard.state_dict()}
        return state

    def load_train_state(self, state: Dict) -> None:
        super().load_train_state(state)
        self.version = state["rl"]["version"]
        self.history.load_state_dict(state["rl"]["history"])
        self.buffer.iteration = state["rl"]["buffer_iteration"]
        self.guard.load_state_dict(state["rl"]["guard"])
        self._apply_lr_scale()

    def _apply_lr_scale(self) -> None:
        """The guard's LR halvings, on top of the schedule (which reads max_lr/min_lr from
        the optimizer's param groups at every step)."""
        t, scale = self.cfg.train, self.guard.lr_scale
        for group in self.optimizer.param_groups:
            group["max_lr"], group["min_lr"] = t.lr * scale, t.min_lr * scale

    def resume(self) -> None:
        """This run's latest checkpoint (train.resume), else the SFT weights of
        rl.init_checkpoint; then the reference weights, and at step 0 the baseline eval."""
        ckpt = self.checkpoints
        path = ckpt.resume_path(self.cfg.train.resume)
        if path is not None:
            ckpt.load(path)
            self.metrics.truncate_after(self.step)
            self._log(f"resumed from {path} at step {self.step}")
        init = self.rl.init_checkpoint
        if path is None or self.reference is not None:
            problem = ckpt.verify(init)
            if problem is not None:
                raise checkpoint.CheckpointError(f"rl.init_checkpoint={init!r} is unusable: "
                                                 f"{problem}")
        if path is None:
            ckpt.load(init, only=("model",))
            self.optimizer.reload_model_params()
            if self.critic is not None:  # the SFT trunk, a fresh value head
                trunk = checkpoint.ModelPart(self.critic, skip=lambda key: key.startswith(HEAD))
                ckpt.load(init, only=("model",), parts={"model": trunk})
                self.critic_optimizer.reload_model_params()
            self._log(f"policy initialised from {init} (weights only)")
        if self.reference is not None:
            ckpt.load(init, only=("model",), parts={"model": checkpoint.ModelPart(self.reference)})
        if self.step == 0:
            rec = self._log_eval()
            if self.rl.eval_interval:
                self._judge(rec)

    # -- one RL step ----------------------------------------------------------------------
    def _seed(self, what: str) -> int:
        return zlib.crc32(f"{self.cfg.seed}:{what}:{self.step}:{self.topo.dp_rank}".encode())

    def _run_forward_only(self, chunks, rows: Rows, output: Callable) -> torch.Tensor:
        """A `[n, t]` per-token output of `chunks` on the rows, `output(micro_batch, model
        output)` (the last stage's; zeros on the other stages, which never use it)."""
        n, width = rows["tokens"].shape
        batches = micro_batches(rows, self.cfg.train.micro_batch_size, self.topo.device)

        def step(data_iterator, model):
            batch = next(data_iterator)
            return (model(batch["tokens"], batch["position_ids"], None),
                    functools.partial(output, batch))

        with torch.no_grad():
            outs = self._run_schedule(batches, step, forward_only=True, model=chunks,
                                      seq_length=width)
        if not outs:
            return torch.zeros(n, width)
        return torch.cat([o["out"] for o in outs])[:n].float().cpu()

    def _dp_sum(self, value: float) -> float:
        """Sum over the DP replicas (each pipeline's ranks hold the same rows)."""
        t = torch.tensor([value], dtype=torch.float64)
        if self.topo.dims.dp > 1:
            dist.all_reduce(t, group=self.topo.dp_group)
        return float(t[0])

    def _advantages(self, rows: Rows, groups) -> Dict[str, float]:
        """Advantages (and reference log-probs, PPO values/returns) into `rows`; returns the
        sums behind the advantage metrics."""
        rl, mask = self.rl, rows["mask"]
        rewards = torch.cat([g.rewards for g in groups]) if groups else torch.zeros(0)
        flat = sum(bool(g.rewards.max() == g.rewards.min()) for g in groups)
        stats = {"zero_adv_groups": float(flat), "trained_groups": float(len(groups))}
        kl = None
        if self.reference is not None:
            rows["ref_logp"] = self._run_forward_only(
                self.reference, rows, functools.partial(
                    logprob_output, self.vocab_size, self.settings.temperature,
                    self.topo.tp_group))
            kl = kl_penalty(rows["old_logp"], rows["ref_logp"], "k1") * mask
        reward_kl = kl is not None and rl.kl_mode == "reward"
        if rl.algorithm == "grpo":
            if reward_kl:  # the sequence's summed KL comes off its reward
                rewards = rewards - rl.kl_coef * kl.sum(1)
            adv = (grpo_advantages(rewards.view(len(groups), -1), normalize_std=rl.normalize_std)
                   .flatten() if groups else rewards)
            rows["advantages"] = adv[:, None] * mask
            return stats
        values = self._run_forward_only(self.critic, rows, value_output) * mask
        token_rewards = last_token_rewards(rewards, mask)
        if reward_kl:
            token_rewards = token_rewards - rl.kl_coef * kl
        adv, returns = gae(token_rewards, values, mask, rl.gamma, rl.lam)
        if self._dp_sum(float(mask.sum())) > 0:
            group = self.topo.dp_group if self.topo.dims.dp > 1 else None
            adv = whiten(adv, mask, group=group)
        rows.update(advantages=adv, old_values=values, returns=returns)
        residual = (returns - values) * mask
        stats.update(ev_n=float(mask.sum()), ev_ret=float(returns.sum()),
                     ev_ret_sq=float((returns ** 2).sum()), ev_res=float(residual.sum()),
                     ev_res_sq=float((residual ** 2).sum()))
        return stats

    def _policy_forward(self, data_iterator, model):
        batch = next(data_iterator)
        logits = model(batch["tokens"], batch["position_ids"], None)
        return logits, functools.partial(policy_objective, batch, self.settings,
                                         self.topo.tp_group)

    def _critic_forward(self, data_iterator, model):
        batch = next(data_iterator)
        values = model(batch["tokens"], batch["position_ids"], None)
        return values, functools.partial(value_objective, batch, self.rl.value_clip,
                                         self.rl.loss_agg)

    def _backward_and_step(self, chunks, optimizer, rows: Rows, forward, names, max_names,
                           inspect):
        """One optimizer step of `chunks` on `rows`: ({name: global sum}, {name: global max},
        grad norm, applied)."""
        batches = micro_batches(rows, self.cfg.train.micro_batch_size, self.topo.device)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        outs = self._run_schedule(batches, forward, forward_only=False, model=chunks,
                                  seq_length=rows["tokens"].size(1))
        if inspect is not None:
            inspect()
        local = (torch.stack([o["sums"] for o in outs]).sum(0).tolist() if outs
                 else [0.0] * len(names))
        sums = dict(zip(names, sum_to_all(local, self._reports_loss)))
        maxes = {}
        if max_names:
            local = (torch.stack([o["maxes"] for o in outs]).amax(0).tolist() if outs
                     else [0.0] * len(max_names))
            maxes = dict(zip(max_names, _max_to_all(local, self._reports_loss)))
        loss = sums["loss"] / max(sums["count"], 1.0)
        applied, grad_norm = _guarded_step(optimizer, self.cfg.train.clip_grad,
                                           math.isfinite(loss))
        return sums, maxes, grad_norm, applied

    def _planned_updates(self) -> int:
        """Updates per RL step, the same on every DP rank whatever its row count: every row of
        a step has the same version, so staleness cuts all of them at the same update."""
        planned = self.rl.ppo_epochs * self.rl.mini_batches
        if self.rl.max_staleness is not None:
            planned = min(planned, self.rl.max_staleness + 1)
        return planned

    def update_policy(self, rows: Rows, inspect_grads: Optional[Callable[[str], None]] = None
                      ) -> Dict[str, float]:
        """`ppo_epochs x mini_batches` updates over the rows via the trajectory buffer (the
        critic's too, for PPO). `inspect_grads(which)`, when given, runs after each backward
        ("policy", "critic") while the reduced gradients sit in the DDP buffers."""
        n = rows["tokens"].size(0)
        if n:
            self.buffer.add(rows, version=self.version)
            minibatches = list(self.buffer.minibatches(self.version))
        else:
            minibatches = []
        empty = {k: v[:0] for k, v in rows.items()}
        minibatches += [empty] * (self._planned_updates() - len(minibatches))
        total: Dict[str, float] = {}
        maxima = dict.fromkeys(POLICY_MAXES, 0.0)
        first, updates, skipped = True, 0, 0
        for mb in minibatches:
            mb = {k: v for k, v in mb.items() if k != "version"}
            if self._dp_sum(float(mb["mask"].sum())) == 0:
                continue  # no response token on any DP rank: no update (Adam would still move)
            inspect = functools.partial(inspect_grads, "policy") if inspect_grads else None
            sums, maxes, grad_norm, applied = self._backward_and_step(
                self.model, self.optimizer, mb, self._policy_forward, POLICY_SUMS, POLICY_MAXES,
                inspect)
            if first:  # same weights as the rollout: the two log-prob paths must agree
                maxima["logprob_diff_max"] = maxes["logprob_diff_max"]
                first = False
            maxima["ratio_max"] = max(maxima["ratio_max"], maxes["ratio_max"])
            per_update = {f"pol_{k}": v for k, v in sums.items()}
            per_update["grad_norm"] = grad_norm
            if self.critic is not None:
                inspect = functools.partial(inspect_grads, "critic") if inspect_grads else None
                vsums, _, vnorm, vapplied = self._backward_and_step(
                    self.critic, self.critic_optimizer, mb, self._critic_forward, VALUE_SUMS, (),
                    inspect)
                per_update.update({f"val_{k}": v for k, v in vsums.items()})
                per_update["critic_grad_norm"] = vnorm
                applied = applied and vapplied
            for k, v in per_update.items():
                total[k] = total.get(k, 0.0) + v
            updates += 1
            skipped += not applied
            self.version += int(applied)
        return self._update_metrics(total, maxima, updates, skipped)

    def _update_metrics(self, total, maxima, updates, skipped) -> Dict[str, float]:
        out = {"updates": updates, "skipped_updates": skipped, **maxima}
        if not updates:
            return out | {"loss": 0.0, "grad_norm": 0.0}
        tokens, count = total["pol_tokens"], max(total["pol_count"], 1.0)
        out.update(loss=total["pol_loss"] / count, pg_loss=total["pol_pg_loss"] / count,
                   grad_norm=total["grad_norm"] / updates)
        for k in ("entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean",
                  "approx_kl"):
            out[k] = total[f"pol_{k}"] / max(tokens, 1.0)
        if self.reference is not None:
            out["kl_ref"] = total["pol_kl_ref"] / max(tokens, 1.0)
        if self.critic is not None:
            vt = max(total["val_tokens"], 1.0)
            out.update(value_loss=total["val_loss"] / max(total["val_count"], 1.0),
                       vf_clip_frac=total["val_vf_clip_frac"] / vt,
                       value_mean=total["val_value_mean"] / vt,
                       critic_grad_norm=total["critic_grad_norm"] / updates)
        return out

    def train_step(self, inspect_grads=None) -> Dict:
        """One RL step: experience, advantages, policy (and critic) updates; every
        rl.eval_interval steps the regression guard."""
        start = time.perf_counter()
        rl, topo = self.rl, self.topo
        result, sampled = collect(self.model, self.pool, self.history, rl=rl, params=self.params,
                                  reward=self.reward, tokenizer=self.tokenizer,
                                  vocab_size=self.vocab_size, seed=self._seed("rollout"),
                                  tp_group=topo.tp_group, pp_group=topo.pp_group)
        self._share_pass_rates(result.observed)
        if result.message and (self.step + 1) % self.cfg.train.log_interval == 0:
            self._log(f"step {self.step + 1}: {result.message}")
        rollout_s = time.perf_counter() - start
        groups = result.groups
        rows = (rows_from_groups(groups, self.tokenizer.pad_id) if groups else
                {k: torch.zeros(0, 1) for k in ("tokens", "targets", "mask", "old_logp")})
        rows["tokens"], rows["targets"] = rows["tokens"].long(), rows["targets"].long()
        adv_stats = self._advantages(rows, groups)
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        upd = self.update_policy(rows, inspect_grads)
        self.step += 1
        if upd["skipped_updates"]:
            self.skipped_steps += 1
            self.bad_in_a_row += 1
        else:
            self.bad_in_a_row = 0
        local = rollout_stats(result, sampled) | adv_stats
        sums = dict(zip(local, sum_to_all(list(local.values()), self._reports_loss)))
        elapsed = time.perf_counter() - start
        rec = {"step": self.step, "loss": upd.pop("loss"), "lr": lr,
               "grad_norm": upd.pop("grad_norm"),
               "tokens_per_s": sums["response_len_sum"] / elapsed, "step_time_s": elapsed,
               "rollout_time_s": rollout_s,
               "skipped_steps": self.skipped_steps, **self._rollout_metrics(sums), **upd}
        if self.topo.is_logging_rank and self.step % self.cfg.train.log_interval == 0:
            print(f"rl    step {self.step:>5} | reward {rec['reward_mean']:.3f} | pass rate "
                  f"{rec['pass_rate']:.1%} | kept {rec['groups_kept']:.0f}/"
                  f"{rec['groups_sampled']:.0f} groups | zero-adv {rec['zero_adv_frac']:.1%} | "
                  f"clip {rec.get('clip_frac', 0.0):.3f} | logprob diff "
                  f"{rec['logprob_diff_max']:.1e}", flush=True)
        if rl.eval_interval and self.step % rl.eval_interval == 0:
            self._judge(self._log_eval())
        return rec

    def _share_pass_rates(self, observed) -> None:
        """Every DP rank records every rank's pass rates, so all draw from one history."""
        if self.topo.dims.dp > 1:
            gathered = [None] * self.topo.dims.dp
            dist.all_gather_object(gathered, observed, group=self.topo.dp_group)
            observed = [o for part in gathered for o in part]
        self.history.update([i for i, _ in observed], [r for _, r in observed])

    @staticmethod
    def _rollout_metrics(s: Dict[str, float]) -> Dict[str, float]:
        n = max(s["samples"], 1.0)
        mean = s["reward_sum"] / n
        out = {"reward_mean": mean,
               "reward_std": math.sqrt(max(s["reward_sq_sum"] / n - mean ** 2, 0.0)),
               "pass_rate": s["correct_sum"] / n, "response_len": s["response_len_sum"] / n,
               "truncated_frac": s["truncated"] / n,
               "zero_adv_frac": s["zero_adv_groups"] / max(s["trained_groups"], 1.0),
               # what training without the difficulty filter would have had
               "zero_adv_frac_sampled": s["zero_adv_sampled"] / max(s["groups_sampled"], 1.0)}
        out.update({k: s[k] for k in ("groups_sampled", "groups_kept", "dropped_too_easy",
                                      "dropped_too_hard", "refill_rounds")})
        if "ev_n" in s and s["ev_n"] > 0:
            var = lambda total, sq: sq / s["ev_n"] - (total / s["ev_n"]) ** 2
            ret_var = var(s["ev_ret"], s["ev_ret_sq"])
            out["explained_variance"] = (1.0 - var(s["ev_res"], s["ev_res_sq"]) / ret_var
                                         if ret_var > 0 else 0.0)
        return out

    # -- evaluation and the regression guard ----------------------------------------------
    def evaluate(self) -> Dict:
        """Held-out answer accuracy by greedy generation (`accuracy`), beside the SFT
        evaluation's loss and teacher-forced exact match (`exact_match`)."""
        rec = super().evaluate()
        topo = self.topo
        solved, count = heldout_accuracy(
            self.model, self.heldout, max_new_tokens=self.rl.max_new_tokens, stop=self.rl.stop,
            tokenizer=self.tokenizer, vocab_size=self.vocab_size, dp_rank=topo.dp_rank,
            dp_size=topo.dims.dp, tp_group=topo.tp_group, pp_group=topo.pp_group)
        solved, count = sum_to_all([solved, count], self._reports_loss)
        rec["exact_match"] = rec.pop("accuracy")
        rec.update(accuracy=solved / max(count, 1.0), samples=int(count))
        return rec

    def _log_eval(self) -> Dict:
        if self._last_eval is not None and self._last_eval["step"] == self.step:
            return self._last_eval  # the guard already evaluated this step
        rec = self.evaluate()
        self._record(rec)
        self._log(f"eval  step {rec['step']:>5} | held-out accuracy {rec['accuracy']:.1%} "
                  f"({rec['samples']} problems, greedy generation, answer checked) | exact "
                  f"match {rec['exact_match']:.1%} | held-out loss {rec['loss']:.4f}")
        self._last_eval = rec
        return rec

    def _judge(self, rec: Dict) -> None:
        verdict = self.guard.judge(rec["accuracy"])
        if verdict == "best":
            self._save_best(rec["accuracy"])
        elif verdict == "regressed":
            self._restore_best(rec)

    def _save_best(self, accuracy: float) -> None:
        g = self.guard
        g.best_accuracy, g.best_step = accuracy, self.step
        g.best_path = os.path.join(self.ckpt_root, f"best_{self.step:08d}")
        self.save(tag="best")
        if self.topo.rank == 0:  # only the newest best is kept
            for name in os.listdir(self.ckpt_root):
                if name.startswith("best_") and name != os.path.basename(g.best_path):
                    shutil.rmtree(os.path.join(self.ckpt_root, name), ignore_errors=True)

    def _restore_best(self, rec: Dict) -> None:
        """Back to the best weights and optimizer state; the step, schedule, pass-rate history
        and counters go on. Then halve the LR, or stop."""
        g = self.guard
        keep = self.train_state()
        self.checkpoints.load(g.best_path)
        self.load_train_state(keep)
        g.restores += 1
        if self.rl.action == "halve_lr":
            g.lr_scale *= 0.5
            self._apply_lr_scale()
        self._last_eval = None
        note = {"step": self.step, "split": "guard", "accuracy": rec["accuracy"],
                "best_accuracy": g.best_accuracy, "best_step": g.best_step,
                "action": self.rl.action, "lr_scale": g.lr_scale, "restores": g.restores}
        self._record(note)
        self._log(f"guard step {self.step:>5} | held-out accuracy {rec['accuracy']:.1%} fell more "
                  f"than {self.rl.margin:.1%} below the best {g.best_accuracy:.1%} (step "
                  f"{g.best_step}): restored that checkpoint"
                  + (f", LR scale now {g.lr_scale:g}" if self.rl.action == "halve_lr"
                     else "; stopping (rl.action=stop)"))
        if self.rl.action == "stop":
            raise _GuardStop()

    def fit(self) -> Dict:
        try:
            return super().fit()
        except _GuardStop:
            if self.cfg.train.save_interval:
                self.save()
            rec = self._log_eval()
            self.logger.finish()
            return rec
