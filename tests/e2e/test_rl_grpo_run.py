"""SFT then GRPO through the CLI, as a user runs them: a short SFT on an easy slice of the
built-in task (one operator, operands 1..4) to a ~40% pass rate, then GRPO from its last
checkpoint (`stage=rl rl=grpo rl.init_checkpoint=...`) on a pool of 16 training prompts. The
mean reward of the last steps must beat the first steps', and the run directory must carry the
RL metrics, the step-0 eval (the SFT model) and the guard's best checkpoint."""
import json
import os
import subprocess
import sys

TASK = ["logging=none", "data.task.max_ops=1", "data.task.max_operand=4"]
SFT_STEPS, RL_STEPS, WINDOW = 120, 20, 4


def _run(args, timeout=300):
    # one thread: a 2-thread pool on a busy 2-core machine spends its time waiting
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", "1", "--",
                           *TASK, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _records(run_dir):
    return [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_grpo_after_sft_raises_reward(tmp_path):
    sft, rl = str(tmp_path / "sft"), str(tmp_path / "grpo")
    _run(["train=demo", f"train.steps={SFT_STEPS}", "train.lr=5e-3", "train.min_lr=5e-4",
          "train.warmup_steps=10", f"train.save_interval={SFT_STEPS}", "train.eval_samples=16",
          "data.num_samples=1000", f"run.dir={sft}"])
    init = os.path.join(sft, "checkpoints", open(os.path.join(sft, "checkpoints",
                                                              "latest")).read().strip())
    out = _run(["stage=rl", "rl=grpo", f"rl.init_checkpoint={init}", f"train.steps={RL_STEPS}",
                "train.lr=5e-4", "train.min_lr=5e-4", "train.warmup_steps=0",
                "train.eval_samples=16", "data.num_samples=16", "rl.prompts_per_step=8",
                "rl.max_new_tokens=20", "rl.band_low=0", "rl.band_high=1",
                "rl.eval_interval=10", "rl.margin=0.5", f"run.dir={rl}"])
    assert f"policy initialised from {init} (weights only)" in out
    progress = [l for l in out.splitlines() if l.startswith("step ")]
    assert len(progress) == RL_STEPS  # one progress line per step, with the RL figures
    assert all(" | reward " in l and " | zero-adv " in l for l in progress), progress[:2]

    records = _records(rl)
    steps = [r for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in steps] == list(range(1, RL_STEPS + 1))
    assert [r["step"] for r in evals] == [0, 10, 20]  # the SFT model, the guard's, the end
    assert all(0 <= r["accuracy"] <= 1 and "exact_match" in r for r in evals)
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "reward_mean", "reward_std",
                "pass_rate", "groups_kept", "dropped_too_easy", "dropped_too_hard",
                "zero_adv_frac", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean",
                "ratio_max", "approx_kl", "entropy", "response_len", "logprob_diff_max"):
        assert key in steps[0], key
    # the first update runs on the rollout's weights: the log-probs agree to fp32 noise (the
    # trained model's logits are larger than the parity test's, hence 1e-4 here)
    assert max(r["logprob_diff_max"] for r in steps) <= 1e-4
    first = sum(r["reward_mean"] for r in steps[:WINDOW]) / WINDOW
    last = sum(r["reward_mean"] for r in steps[-WINDOW:]) / WINDOW
    assert last >= first + 0.05, (first, last, [round(r["reward_mean"], 3) for r in steps])
    best = [n for n in os.listdir(os.path.join(rl, "checkpoints")) if n.startswith("best_")]
    assert len(best) == 1
