"""The RL recipe (GRPO, PPO) on the shared engine: the policy trains in the layout it was
trained in by SFT, and generates its own rollouts with the same weights (nothing to sync).

One step is a pipeline:
  collect  draw prompts (weighted by their pass-rate history), sample `group_size` responses
           each, score them, keep the groups inside the difficulty band (refilling the batch);
  prepare  reference log-probs (when the KL is on), critic values (PPO), advantages by the
           registered algorithm;
  update   `ppo_epochs x mini_batches` policy (and critic) updates over the trajectory buffer.
The policy starts from an SFT checkpoint's weights (`rl.init_checkpoint`); the run's own
checkpoints resume it exactly like SFT.
"""
from __future__ import annotations

import functools
import math
import time
import zlib
from typing import Callable, Dict, List, Optional

import torch

from megatron_ext.config.engine import resolve_engine
from megatron_ext.convert.hf_load import load_hf_weights
from megatron_ext.convert.origin import ModelOrigin
from megatron_ext.data.dataset import build_rows
from megatron_ext.data.problems import rl_problems
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.models.critic import HEAD, build_critic, critic_config
from megatron_ext.models.generate import SamplingParams
from megatron_ext.models.gpt import build_gpt_chunks, build_model, model_vocab_size
from megatron_ext.models.offload import offload_reference
from megatron_ext.rl.algorithms import explained_variance, get_algorithm
from megatron_ext.rl.buffer import TrajectoryBuffer
from megatron_ext.rl.evaluation import describe, heldout_eval
from megatron_ext.rl.experience import PromptPool, collect, rollout_stats
from megatron_ext.rl.filtering import PassRateHistory
from megatron_ext.rl.guard import RegressionGuard
from megatron_ext.rl.losses import kl_penalty
from megatron_ext.rl.objective import (POLICY_METRICS, VALUE_METRICS, PolicySettings,
                                       logprob_output, policy_objective, value_objective,
                                       value_output)
from megatron_ext.rl.rewards import CombinedReward
from megatron_ext.rl.rows import Rows, micro_batches, rows_from_groups
from megatron_ext.training import collectives
from megatron_ext.training.checkpoint import (CheckpointError, ModelPart, model_shape,
                                              read_train_state)
from megatron_ext.training.engine import ModelUnit, trained_unit
from megatron_ext.training.heldout import heldout_lm

# token-weighted sums of the objectives that the step reports as means over tokens
_POLICY_MEANS = ("entropy", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean",
                 "approx_kl")
_ROW_KEYS = ("tokens", "targets", "mask", "old_logp")


class RLRecipe:
    eval_at_start = True  # the starting weights' accuracy is the guard's first best

    def __init__(self, cfg, topo, log: Callable[[str], None]):
        self.cfg, self.topo, self.log, self.rl = cfg, topo, log, cfg.rl
        rl = cfg.rl
        self.tokenizer = build_tokenizer(cfg.data.tokenizer)
        self.vocab_size = model_vocab_size(cfg, self.tokenizer)
        self.algorithm = get_algorithm(rl.algorithm)
        # every unit's weights are loaded in start() (init checkpoint or HF) or on resume
        self.policy = trained_unit("model", cfg, topo,
                                   build_model(cfg, topo, self.vocab_size, init=False))
        self.units: Dict[str, ModelUnit] = {"model": self.policy}
        self.shape = model_shape(cfg.model, self.vocab_size, self.policy.chunks)
        self.critic = self.reference = None
        if self.algorithm.uses_critic:
            self.critic = trained_unit("critic", critic_config(cfg), topo,
                                       build_critic(cfg, topo, self.vocab_size, init=False))
            self.units["critic"] = self.critic
        if rl.kl_coef > 0:  # the frozen reference policy: only when the KL is on
            chunks = build_gpt_chunks(cfg, topo, self.vocab_size, init=False)
            self.reference = ModelUnit("reference", chunks, topo,
                                       micro_batch_size=cfg.train.micro_batch_size,
                                       seq_length=cfg.train.seq_len).freeze()
        train, heldout = rl_problems(cfg, self.tokenizer)
        self.pool = PromptPool(train, self.tokenizer)
        self.heldout = PromptPool(heldout, self.tokenizer)
        # teacher-forced rows need reference solutions: the task's (JSONL problems have answers)
        self.heldout_rows = (build_rows(cfg, self.tokenizer, "heldout")
                             if cfg.data.source == "task" else None)
        self.reward = CombinedReward(rl.rewards)
        self.history = PassRateHistory(rl.band_low, rl.band_high)
        self.buffer = TrajectoryBuffer(epochs=rl.ppo_epochs, mini_batches=rl.mini_batches,
                                       max_staleness=rl.max_staleness, seed=cfg.seed)
        self.params = SamplingParams(rl.max_new_tokens, rl.temperature, rl.top_p, tuple(rl.stop))
        # megatron's engine (rl.engine) runs other attention kernels than the training forward,
        # which recomputes its old log-probs in prepare() so that the first PPO ratio is 1
        self.recompute_old_logp = resolve_engine(
            rl.engine, "rl.engine", temperature=rl.temperature, stop=rl.stop,
            pp=cfg.parallel.pp, vpp=cfg.parallel.vpp, dtype=cfg.model.dtype) == "megatron"
        self.settings = PolicySettings(
            vocab_size=self.vocab_size, temperature=rl.temperature or 1.0, eps_low=rl.eps_low,
            eps_high=rl.eps_high, dual_clip=rl.dual_clip or None, agg=rl.loss_agg,
            entropy_coef=rl.entropy_coef,
            kl_coef=rl.kl_coef if rl.kl_mode == "loss" else 0.0, kl_estimator=rl.kl_estimator)
        self.guard = RegressionGuard(rl.margin, rl.action, self.policy, cfg.train.lr,
                                     cfg.train.min_lr)
        self.eval_interval = rl.eval_interval
        self.eval_hooks = [self.guard] if rl.eval_interval else []
        self.version = 0  # policy updates so far: the buffer's policy version
        self.origin = ModelOrigin(cfg)  # where the weights came from (HF export reads it)

    # -- state ------------------------------------------------------------------------------
    def states(self) -> Dict:
        return {"schedule": self.policy.scheduler, "rl": self, "guard": self.guard,
                "origin": self.origin}

    def state_dict(self) -> Dict:
        return {"version": self.version, "history": self.history.state_dict(),
                "buffer_iteration": self.buffer.iteration}

    def load_state_dict(self, state: Dict) -> None:
        self.version = state["version"]
        self.history.load_state_dict(state["history"])
        self.buffer.iteration = state["buffer_iteration"]

    def start(self, resumed: bool, checkpoints) -> None:
        """The starting weights; then, with rl.offload_reference, the reference's go to the
        host (once loaded: they never change)."""
        self._load_start(resumed, checkpoints)
        if self.reference is not None and self.rl.offload_reference:
            self.reference_host = offload_reference(self.reference.chunks,
                                                    self.reference.device, self.log)

    def _load_start(self, resumed: bool, checkpoints) -> None:
        """A fresh run takes the SFT weights of rl.init_checkpoint (the critic its trunk, with
        a fresh value head); the reference always does."""
        init = self.rl.init_checkpoint
        starting = [] if resumed else [(self.policy, None)]
        if self.critic is not None and not resumed:
            starting.append((self.critic, lambda key: key.startswith(HEAD)))
        if self.reference is not None:
            starting.append((self.reference, None))
        if not starting:
            return
        if not init:  # model=hf: every unit starts from the HF weights
            for unit, skip in starting:
                load_hf_weights(unit.chunks, self.cfg.model.hf_path, self.topo, self.vocab_size,
                                skip=skip)
                if unit.optimizer is not None:
                    unit.optimizer.reload_model_params()
            if not resumed:
                self.log(f"policy initialised from {self.cfg.model.hf_path}")
            return
        problem = checkpoints.verify(init)
        if problem is not None:
            raise CheckpointError(f"rl.init_checkpoint={init!r} is unusable: {problem}")
        for unit, skip in starting:  # weights only: optimizer state, step and schedule stay
            checkpoints.load(init, only=("model",), parts={"model": ModelPart(unit.chunks, skip=skip)})
            if unit.optimizer is not None:
                unit.optimizer.reload_model_params()
        if not resumed:
            self.origin.load_state_dict(read_train_state(init).get("origin", self.origin.record))
            self.log(f"policy initialised from {init} (weights only)")

    # -- one step ---------------------------------------------------------------------------
    def train_step(self, step: int, inspect_grads=None) -> Dict:
        """collect -> prepare -> update. `inspect_grads(which)` runs after each backward
        ("policy", "critic") while the reduced gradients sit in the DDP buffers."""
        started = time.perf_counter()
        result, sampled = self.collect(step)
        rollout_s = time.perf_counter() - started  # the rest of step_time_s: scoring, update
        rows, prepared = self.prepare(result.groups)
        self.policy.scheduler.step(increment=1)
        lr = self.policy.lr
        upd = self.update(rows, inspect_grads)
        local = rollout_stats(result, sampled) | prepared
        s = dict(zip(local, collectives.reduce_floats(list(local.values()),
                                                       contribute=self.policy.reports)))
        if result.message and step % self.cfg.train.log_interval == 0:
            self.log(f"step {step}: {result.message}")
        return {"loss": upd.pop("loss"), "lr": lr, "grad_norm": upd.pop("grad_norm"),
                "applied": upd["skipped_updates"] == 0, "tokens": s["response_len_sum"],
                "rollout_time_s": rollout_s,
                **self._rollout_metrics(s), **upd}

    def _seed(self, what: str, step: int) -> int:
        return zlib.crc32(f"{self.cfg.seed}:{what}:{step}:{self.topo.dp_rank}".encode())

    def collect(self, step: int):
        """Rollouts by the policy itself until the band holds rl.prompts_per_step groups; every
        DP rank then records every rank's pass rates, so all draw from one history."""
        topo = self.topo
        result, sampled = collect(self.policy.chunks, self.pool, self.history, rl=self.rl,
                                  params=self.params, reward=self.reward,
                                  tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                                  seed=self._seed("rollout", step), device=self.policy.device,
                                  tp_group=topo.tp_group, pp_group=topo.pp_group)
        observed = result.observed
        if topo.dims.dp > 1:
            gathered = [None] * topo.dims.dp
            torch.distributed.all_gather_object(gathered, observed, group=topo.dp_group)
            observed = [o for part in gathered for o in part]
        self.history.update([i for i, _ in observed], [r for _, r in observed])
        return result, sampled

    def _forward_values(self, unit: ModelUnit, rows: Rows, output: Callable) -> torch.Tensor:
        """A `[n, t]` per-token output of `unit` on the rows, on the model's device (the last
        stage's; zeros on the other stages, which never use it)."""
        n, width = rows["tokens"].shape
        batches = micro_batches(rows, self.cfg.train.micro_batch_size, unit.device)
        outs = unit.forward_only(batches, output, seq_length=width)
        if not outs:
            return torch.zeros(n, width, device=unit.device)
        return torch.cat([o["out"] for o in outs])[:n].float()

    def prepare(self, groups) -> tuple:
        """The kept groups as training rows with reference log-probs, values and advantages, all
        on the model's device (the rewards come from the host); and the sums behind the
        advantage metrics."""
        rl, device = self.rl, self.policy.device
        rows = (rows_from_groups(groups, self.tokenizer.pad_id) if groups else
                {k: torch.zeros(0, 1) for k in _ROW_KEYS})
        rows = {k: v.to(device) for k, v in rows.items()}
        rows["tokens"], rows["targets"] = rows["tokens"].long(), rows["targets"].long()
        if self.recompute_old_logp and groups:
            rows["old_logp"] = self._forward_values(self.policy, rows, functools.partial(
                logprob_output, self.vocab_size, self.settings.temperature,
                self.topo.tp_group)) * rows["mask"]
        rewards = (torch.cat([g.rewards for g in groups]) if groups else torch.zeros(0)).to(device)
        stats = {"zero_adv_groups": float(sum(bool(g.rewards.max() == g.rewards.min())
                                              for g in groups)),
                 "trained_groups": float(len(groups))}
        reward_kl = values = None
        if self.reference is not None:
            rows["ref_logp"] = self._forward_values(self.reference, rows, functools.partial(
                logprob_output, self.vocab_size, self.settings.temperature, self.topo.tp_group))
            if rl.kl_mode == "reward":
                reward_kl = kl_penalty(rows["old_logp"], rows["ref_logp"], "k1") * rows["mask"]
        if self.critic is not None:
            values = self._forward_values(self.critic, rows, value_output)
        dp_group = self.topo.dp_group if self.topo.dims.dp > 1 else None
        stats |= self.algorithm.advantages(rows, rewards, rl.group_size, reward_kl, values, rl,
                                           dp_group)
        return rows, stats

    def _planned_updates(self) -> int:
        """Updates per RL step, the same on every DP rank whatever its row count: every row of
        a step has the same version, so staleness cuts all of them at the same update."""
        planned = self.rl.ppo_epochs * self.rl.mini_batches
        if self.rl.max_staleness is not None:
            planned = min(planned, self.rl.max_staleness + 1)
        return planned

    def update(self, rows: Rows, inspect_grads=None) -> Dict[str, float]:
        """`ppo_epochs x mini_batches` updates over the rows via the trajectory buffer (the
        critic's too, for PPO); metrics averaged over the updates."""
        minibatches: List[Rows] = []
        if rows["tokens"].size(0):
            self.buffer.add(rows, version=self.version)
            minibatches = [{k: v for k, v in mb.items() if k != "version"}
                           for mb in self.buffer.minibatches(self.version)]
        empty = {k: v[:0] for k, v in rows.items()}
        minibatches += [empty] * (self._planned_updates() - len(minibatches))
        units = [("policy", self.policy, functools.partial(
            policy_objective, self.settings, self.topo.tp_group), POLICY_METRICS)]
        if self.critic is not None:
            units.append(("critic", self.critic, functools.partial(
                value_objective, self.rl.value_clip, self.rl.loss_agg), VALUE_METRICS))
        sums: Dict[str, Dict[str, float]] = {name: {} for name, *_ in units}
        first_diff, ratio_max, updates, skipped = 0.0, 0.0, 0, 0
        for mb in minibatches:
            if collectives.reduce_floats([float(mb["mask"].sum())])[0] == 0:
                continue  # no response token on any rank: no update (Adam would still move)
            batches = micro_batches(mb, self.cfg.train.micro_batch_size, self.policy.device)
            applied = True
            for name, unit, objective, specs in units:
                hook = functools.partial(inspect_grads, name) if inspect_grads else None
                result = unit.train_on(batches, objective, specs, seq_length=mb["tokens"].size(1),
                                       inspect_grads=hook)
                for spec in specs:
                    if spec.reduce == "sum":
                        sums[name][spec.name] = sums[name].get(spec.name, 0.0) + result.values[spec.name]
                sums[name]["grad_norm"] = sums[name].get("grad_norm", 0.0) + result.grad_norm
                applied = applied and result.applied
                if name == "policy":
                    if updates == 0:  # same weights as the rollout: both log-probs must agree
                        first_diff = result.values["logprob_diff_max"]
                    ratio_max = max(ratio_max, result.values["ratio_max"])
            updates += 1
            skipped += not applied
            self.version += int(applied)
        out = {"updates": updates, "skipped_updates": skipped, "ratio_max": ratio_max,
               "logprob_diff_max": first_diff}
        return out | self._update_means(sums, updates)

    def _update_means(self, totals: Dict[str, Dict[str, float]], updates: int) -> Dict:
        if not updates:
            return {"loss": 0.0, "grad_norm": 0.0}
        p = totals["policy"]
        tokens = max(p["tokens"], 1.0)
        out = {"loss": p["loss"] / max(p["count"], 1.0), "pg_loss": p["pg_loss"] / max(p["count"], 1.0),
               "grad_norm": p["grad_norm"] / updates,
               **{k: p[k] / tokens for k in _POLICY_MEANS}}
        if self.reference is not None:
            out["kl_ref"] = p["kl_ref"] / tokens
        if self.critic is not None:
            v = totals["critic"]
            vt = max(v["tokens"], 1.0)
            out.update(value_loss=v["loss"] / max(v["count"], 1.0),
                       vf_clip_frac=v["vf_clip_frac"] / vt, value_mean=v["value_mean"] / vt,
                       critic_grad_norm=v["grad_norm"] / updates)
        return out

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
        if s.get("ev_n", 0) > 0:
            out["explained_variance"] = explained_variance(s)
        return out

    def progress(self, rec: Dict) -> str:
        return (f" | reward {rec['reward_mean']:.3f} | pass {rec['pass_rate']:.1%} | kept "
                f"{rec['groups_kept']:.0f}/{rec['groups_sampled']:.0f} | zero-adv "
                f"{rec['zero_adv_frac']:.1%} | clip {rec.get('clip_frac', 0.0):.3f} | "
                f"logprob diff {rec['logprob_diff_max']:.1e}")

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, step: int) -> Optional[Dict]:
        """Held-out answer accuracy by greedy generation (`accuracy`, also `pass@1`; sampled
        pass@1 and pass@k with rl.eval_k > 1), beside the teacher-forced held-out loss and
        exact match."""
        lm = (heldout_lm(self.policy, self.heldout_rows, self.vocab_size)
              if self.heldout_rows is not None else None)
        rec = {"step": step, "split": "eval"} | heldout_eval(
            self.policy.chunks, self.heldout, self.rl, tokenizer=self.tokenizer,
            vocab_size=self.vocab_size, topo=self.topo, seed=self._seed("eval", step),
            device=self.policy.device, contribute=self.policy.reports)
        line = (f"eval  step {step:>5} | held-out accuracy {rec['accuracy']:.1%} "
                f"({rec['samples']} problems, greedy generation, answer checked)")
        sampled = describe(rec, self.rl)
        if sampled:
            line += f" | {sampled}"
        if lm is not None:
            rec |= {"loss": lm["loss"], "exact_match": lm["exact_match"]}
            line += f" | exact match {lm['exact_match']:.1%} | held-out loss {lm['loss']:.4f}"
        self.log(line)
        return rec
