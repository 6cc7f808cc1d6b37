"""An RL update under TP=2 and under PP=2 equals one process's, from the same weights on the
same fixed rollout batch (so sampling is not part of the comparison): GRPO with a KL term and
an entropy bonus, and PPO with its critic; two mini-batches, so the second update runs after an
optimizer step. Then one real RL step per layout, whose first update must reproduce the
rollout's log-probs (logprob_diff_max <= 1e-5 in fp32), and (one process, PPO) the regression
guard's restore. One spawn per world size."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist

from tests.dist._spawn import run_distributed

TOL = 1e-5
BASE = ["stage=rl", "logging=none", "model.vocab_size=512", "train.micro_batch_size=2",
        "train.lr=1e-3", "train.min_lr=1e-3", "train.warmup_steps=0", "train.adam_eps=1e-5",
        "data.num_samples=64", "train.eval_samples=4", "rl.group_size=4",
        "rl.prompts_per_step=2", "rl.max_new_tokens=8", "rl.mini_batches=2", "rl.band_low=0",
        "rl.band_high=1", "rl.kl_coef=0.05", "rl.entropy_coef=0.01", "seed=7"]
ALGORITHMS = {"grpo": ["rl=grpo"], "ppo": ["rl=ppo", "rl.ppo_epochs=1", "rl.critic_lr=1e-3"]}
LAYOUTS = {1: {"ref": []}, 2: {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}}


def _fixed_rows(trainer):
    """Eight rows: two prompts x four responses (the reference solution, then shifted copies),
    with arbitrary but fixed old/ref log-probs, advantages, values and returns."""
    tok, gen = trainer.tokenizer, torch.Generator().manual_seed(3)
    seqs, starts = [], []
    for problem, prompt in zip(trainer.pool.problems[:2], trainer.pool.prompts[:2]):
        answer = tok.encode(problem.response()) + [tok.eos_id]
        for k in range(4):
            seqs.append(prompt + answer[k:])
            starts.append(len(prompt))
    width = max(map(len, seqs))
    tokens = torch.full((len(seqs), width), tok.pad_id)
    mask = torch.zeros(len(seqs), width)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        tokens[i, :len(s)] = torch.tensor(s)
        mask[i, start:len(s)] = 1.0
    n, t = len(seqs), width - 1
    mask = mask[:, 1:]
    base = -math.log(trainer.vocab_size)
    rows = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
            "old_logp": (base + 0.3 * torch.randn(n, t, generator=gen)) * mask,
            "ref_logp": (base + 0.1 * torch.randn(n, t, generator=gen)) * mask,
            "advantages": torch.randn(n, 1, generator=gen) * mask}
    if trainer.critic is not None:
        rows.update(advantages=torch.randn(n, t, generator=gen) * mask,
                    old_values=0.1 * torch.randn(n, t, generator=gen) * mask,
                    returns=torch.randn(n, t, generator=gen) * mask)
    return rows


def _models(recipe):
    models = {"policy": recipe.policy.chunks, "reference": recipe.reference.chunks}
    if recipe.critic is not None:
        models["critic"] = recipe.critic.chunks
    return models


def _check_guard_restore(loop, topo):
    """A regression past rl.margin restores the best checkpoint's policy and critic, halves
    the LR and keeps the step count."""
    from megatron_ext.models.reshard import gather_full_state

    recipe, guard = loop.recipe, loop.recipe.guard
    assert guard({"accuracy": 0.5}, loop) is None  # the first eval is the best so far: saved
    best = {k: gather_full_state(m, topo) for k, m in _models(recipe).items() if k != "reference"}
    loop.step += 1
    recipe.train_step(loop.step)
    assert guard({"accuracy": 0.5 - 2 * recipe.rl.margin}, loop) == "restored"
    after = {k: gather_full_state(m, topo) for k, m in _models(recipe).items() if k != "reference"}
    if topo.rank == 0:
        for key in best:
            assert _max_diff(after[key], best[key]) == 0, key
    assert loop.step == 3 and guard.lr_scale == 0.5
    assert recipe.policy.optimizer.param_groups[0]["max_lr"] == 0.5 * recipe.cfg.train.lr


def run_layouts(rank, world_size, out_dir):
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.init import initialize_weights
    from megatron_ext.models.reshard import gather_full_state, load_full_state
    from parallel import topology

    compat.setup()
    from megatron.core import parallel_state as ps

    from megatron_ext.train import build_loop

    for algo, algo_overrides in ALGORITHMS.items():
        for name, overrides in LAYOUTS[world_size].items():
            run_dir = os.path.join(out_dir, f"{algo}_{name}")
            cfg = compose_config(BASE + algo_overrides + overrides +
                                 [f"rl.init_checkpoint={out_dir}", f"run.dir={run_dir}"])
            topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
            os.makedirs(run_dir, exist_ok=True)
            loop = build_loop(cfg, topo, run_dir)
            trainer = loop.recipe
            init_path = os.path.join(out_dir, f"{algo}_init.pt")
            models = _models(trainer)
            if world_size == 1:  # the reference layout writes the weights every layout loads
                for m in models.values():  # the recipe leaves them to start()'s load
                    initialize_weights(m, cfg.seed, trainer.vocab_size, topo)
                with torch.no_grad():  # a non-zero value head, so the critic trunk gets grads
                    for chunk in models.get("critic", []):
                        if chunk.module.post_process:
                            chunk.module.output_layer.weight.normal_(0, 0.3)
                init = {k: gather_full_state(m, topo) for k, m in models.items()}
                init["reference"] = init["policy"]
                torch.save(init, init_path)
            init = torch.load(init_path, weights_only=True)
            for key, chunks in models.items():
                load_full_state(chunks, init[key], topo)
            trainer.policy.optimizer.reload_model_params()
            if trainer.critic is not None:
                trainer.critic.optimizer.reload_model_params()

            grads = []
            inspect = lambda which: grads.append(
                (which, gather_full_state(models[which], topo, grads=True)))
            metrics = trainer.update(_fixed_rows(trainer), inspect_grads=inspect)
            weights = gather_full_state(models["policy"], topo)
            loop.step = 2
            step = trainer.train_step(loop.step)  # a real rollout and update
            assert step["updates"] == 2, step
            assert step["logprob_diff_max"] <= TOL, (algo, name, step["logprob_diff_max"])
            if world_size == 1 and algo == "ppo":
                _check_guard_restore(loop, topo)
            if rank == 0:
                torch.save({"metrics": metrics, "grads": grads, "weights": weights,
                            "step": step}, os.path.join(out_dir, f"{algo}_{name}.pt"))
            ps.destroy_model_parallel()
            dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl_parity"))
    for world_size in LAYOUTS:
        run_distributed(run_layouts, world_size, out)
    return {f"{a}_{n}": torch.load(os.path.join(out, f"{a}_{n}.pt"), weights_only=True)
            for a in ALGORITHMS for layouts in LAYOUTS.values() for n in layouts}


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
@pytest.mark.parametrize("layout", list(LAYOUTS[2]))
def test_rl_update_matches_single_process(results, algo, layout):
    ref, got = results[f"{algo}_ref"], results[f"{algo}_{layout}"]
    keys = ["loss", "pg_loss", "entropy", "kl_ref", "clip_frac", "ratio_mean", "approx_kl",
            "ratio_max"] + (["value_loss", "value_mean"] if algo == "ppo" else [])
    for key in keys:
        assert abs(got["metrics"][key] - ref["metrics"][key]) <= TOL, (key, got["metrics"][key],
                                                                       ref["metrics"][key])
    assert [w for w, _ in got["grads"]] == [w for w, _ in ref["grads"]]
    assert len(ref["grads"]) == (4 if algo == "ppo" else 2)  # two updates each
    for (which, g), (_, r) in zip(got["grads"], ref["grads"]):
        scale = max(v.abs().max().item() for v in r.values())
        assert scale > 1e-4  # real gradients
        assert _max_diff(g, r) <= TOL * max(1.0, scale), (which, _max_diff(g, r), scale)
    assert _max_diff(got["weights"], ref["weights"]) <= TOL
    # the batch exercised both clip sides and the metrics are not degenerate
    assert ref["metrics"]["clip_frac"] > 0 and ref["metrics"]["kl_ref"] > 0


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_rl_step_reproduces_rollout_logprobs(results, algo):
    for name in ("ref", *LAYOUTS[2]):
        step = results[f"{algo}_{name}"]["step"]
        assert step["logprob_diff_max"] <= TOL and step["groups_kept"] == 2
        assert math.isfinite(step["loss"]) and step["response_len"] > 0
