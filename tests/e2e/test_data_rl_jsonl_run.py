"""GRPO on the user's own problems from the CLI: a short SFT teaches a tiny model to answer
`\\boxed{\\frac{a}{b}}`, then `stage=rl data=jsonl` at TP2 scores its samples against decimal
answers ("0.5") with the `math` reward (math-verify: no string match would accept them) plus
a user reward by import path that reads an extra field of the record. On a learnable set GRPO
raises the mean reward, and the eval reports pass@1 and pass@k (rl.eval_k)."""
import json
import math
import os
import subprocess
import sys

PAIRS = [(1, 2), (1, 4), (3, 4), (1, 5), (2, 5), (3, 5), (4, 5), (1, 8)]
USER_REWARD = '''
def score(response, record):
    """0.5 for every response to a record tagged "bonus" (an extra JSONL field)."""
    return 0.5 if record["tag"] == "bonus" else 0.0
'''


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _sft_checkpoint(run_dir):
    checkpoints = os.path.join(run_dir, "checkpoints")
    return os.path.join(checkpoints, open(os.path.join(checkpoints, "latest")).read().strip())


def _run(args, nproc, env_extra=None, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run([sys.executable, "-m", "launch", "local", "--nproc", str(nproc), "--",
                           "logging=none", "model.vocab_size=512", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_grpo_on_jsonl_problems_with_the_math_reward_at_tp2(tmp_path):
    prompts = [f"Q: {a}/{b}\n" for a, b in PAIRS]
    sft_data = _write(tmp_path / "sft.jsonl", [
        {"prompt": p, "response": f"\\boxed{{\\frac{{{a}}}{{{b}}}}}"} for p, (a, b) in
        zip(prompts, PAIRS)])
    problems = _write(tmp_path / "problems.jsonl", [
        {"prompt": p, "answer": str(a / b), "tag": "bonus"} for p, (a, b) in zip(prompts, PAIRS)])
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "rewards.py").write_text(USER_REWARD)

    sft = str(tmp_path / "sft")
    _run(["data=jsonl", f"data.path={sft_data}", "data.pack=false", "train.steps=60",
          "train.seq_len=32", "train.micro_batch_size=8", "train.global_batch_size=8",
          "train.lr=5e-3", "train.min_lr=1e-3", "train.warmup_steps=5",
          "train.save_interval=60", f"run.dir={sft}"], nproc=1)
    init = _sft_checkpoint(sft)
    rl = str(tmp_path / "rl")
    out = _run(["stage=rl", "rl=grpo", f"rl.init_checkpoint={init}", "parallel.tp=2",
                "data=jsonl", f"data.path={problems}", f"data.valid_path={problems}",
                "rl.rewards=[{name: math, weight: 1}, {name: 'userpkg.rewards:score', weight: 1}]",
                "train.steps=3", "train.seq_len=48", "train.micro_batch_size=4",
                "train.lr=1e-4", "train.min_lr=1e-4", "train.warmup_steps=0",
                "rl.prompts_per_step=4", "rl.group_size=4", "rl.max_new_tokens=24",
                f"run.dir={rl}"], nproc=2, env_extra={"PYTHONPATH": os.pathsep.join(
                    [str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert "layout: world 2 = tp 2" in out
    records = [json.loads(l) for l in open(os.path.join(rl, "metrics.jsonl"))]
    steps = [r for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3] and evals
    for e in evals:  # rl.eval_k=1 (the default): pass@1 is the greedy accuracy, no sampling
        assert e["pass@1"] == e["accuracy"] and not any(k.startswith("pass@") and k != "pass@1"
                                                        for k in e), e
    for r in steps:
        assert all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "reward_mean"))
        # total = math (the pass rate's verifier) x 1 + the user's 0.5 on every response
        assert abs(r["reward_mean"] - (r["pass_rate"] + 0.5)) < 1e-6, r
    # the SFT model writes \boxed{\frac{a}{b}}: only math-verify equates that with "0.5"
    assert max(r["pass_rate"] for r in steps) > 0 or max(e["accuracy"] for e in evals) > 0


def learnable_grpo_run(tmp_path, seed):
    """SFT, then GRPO at TP2 with the math reward and rl.eval_k=4, on a learnable set: eight
    fractions a/(2a), all equal to the answer "0.5", which SFT taught to answer with one of
    \\frac{1}{2}, \\frac{1}{3}, \\frac{2}{3} alike (a third of the samples right). GRPO must
    find that math-verify scores only the first. The run's metrics records, in order."""
    prompts = [f"Q: {a}/{2 * a}\n" for a in range(1, 9)]
    sft_data = _write(tmp_path / "sft.jsonl", [
        {"prompt": p, "response": f"\\boxed{{\\frac{{{a}}}{{{b}}}}}"} for p in prompts
        for a, b in [(1, 2), (1, 3), (2, 3)]])
    problems = _write(tmp_path / "problems.jsonl", [{"prompt": p, "answer": "0.5"}
                                                     for p in prompts])
    sft = str(tmp_path / "sft")
    _run([f"seed={seed}", "data=jsonl", f"data.path={sft_data}", "data.pack=false",
          "train.steps=200", "train.seq_len=32", "train.micro_batch_size=8",
          "train.global_batch_size=8", "train.lr=5e-3", "train.min_lr=1e-3",
          "train.warmup_steps=5", "train.save_interval=200", f"run.dir={sft}"], nproc=1)
    rl = str(tmp_path / "rl")
    out = _run([f"seed={seed}", "stage=rl", "rl=grpo", f"rl.init_checkpoint={_sft_checkpoint(sft)}",
                "parallel.tp=2", "data=jsonl", f"data.path={problems}",
                f"data.valid_path={problems}", "rl.rewards=[{name: math, weight: 1}]",
                "train.steps=12", "train.seq_len=48", "train.micro_batch_size=4",
                "train.lr=3e-4", "train.min_lr=3e-4", "train.warmup_steps=0",
                "rl.prompts_per_step=4", "rl.group_size=8", "rl.max_new_tokens=24",
                "rl.eval_k=4", f"run.dir={rl}"], nproc=2)
    assert "layout: world 2 = tp 2" in out and "pass@4" in out
    return [json.loads(l) for l in open(os.path.join(rl, "metrics.jsonl"))]


def test_grpo_raises_the_math_reward_on_a_learnable_jsonl_set_at_tp2(tmp_path):
    records = learnable_grpo_run(tmp_path, seed=1)
    rewards = [r["reward_mean"] for r in records if "split" not in r]
    evals = [r for r in records if r.get("split") == "eval"]
    assert len(rewards) == 12 and [e["step"] for e in evals] == [0, 12]
    # seeds 1, 2, 3 rose by 0.43, 0.28, 0.35 (last three steps over the first three), and
    # the sampled pass@1 by 0.53, 0.31, 0.47; a run repeats exactly under its seed
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards
    for e in evals:  # sampled pass@1 and pass@4 from the same 4 samples per problem
        assert 0 <= e["pass@1"] <= e["pass@4"] <= 1 and 0 <= e["accuracy"] <= 1, e
    assert evals[-1]["pass@1"] > evals[0]["pass@1"] + 0.15, evals
