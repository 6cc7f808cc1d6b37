"""Trace-format alignment in miniature (issue 9): SFT the tiny GPT on the same arithmetic problems
with reasoning traces in the target format, in misaligned formats, and as a mix passed through the
fidelity gate; compare held-out ANSWER accuracy by greedy generation. Prints a markdown table.

    PYTHONPATH=. .venv/bin/python benchmarks/format_alignment.py [--steps 200] [--train-n 2000]
        [--eval-n 256] [--out /tmp/format_alignment] [--seed 1234] [--batch 32] [--arms a,b,c,d]

Arms (every arm: the same problems, run seed, steps, LR schedule and batch):
  a aligned      the N training problems rendered in the `target` style;
  b misaligned   the same N problems, problem i in verbose / coarse / latex (i mod 3);
  c gated mix    the same N problems, even i in `target`, odd i in a misaligned style (cycling the
                 three), through `data.fidelity_gate` (action=filter, min_trace_score 0.5) against
                 a reference of target-style traces (other draws of the task): it trains on the
                 traces the gate keeps (the target half plus the one-operator coarse traces,
                 which are identical to target; about 0.58 N);
  d mix          the same mix without the gate (what the gate buys).

Problems: the task's default 1..2 operators, operands 1..9 (the `make demo` task). A 60-step pilot
on 2-operator-only problems got no answer right, and a longer one did not fit the time budget.
Caveat, measured and printed: with one operator the `coarse` style renders exactly as `target`
("a+b=c\nA: c"), so about a sixth of the misaligned arm's traces (coarse x 1-operator) are in fact
in the target format; the gate keeps those, correctly. The column "aligned share" gives each arm's
share of target-format traces. The reference is not filtered against the training prompts: the
train split has only ~220 one-operator expressions, all of them in a 2,000-problem training set,
and a reference of two-operator traces only made the gate reject 1-step target traces.

Equal examples, not equal tokens: data.pack=false, one example per row padded to seq_len 256
(the longest verbose trace fits), so every arm sees the same number of examples per step and the
same problems the same number of times (a, b and d also in the same order: same file order, same
sampler seed); a packed, token-matched run would show the short target traces ~5x more often.
Each SFT run is one process (TP=1) with OMP_NUM_THREADS=--threads (1: two threads per process
ran 3-10x slower while other jobs shared the two cores).

Metric: held-out answer accuracy by greedy generation (megatron_ext.models.generate.generate on the
final checkpoint, loaded with the CheckpointManager's load(only=("model",)) into the model the
trainer builds), judged by the task verifier rl.rewards.task_correct: the integer on the last `A: <int>`
line equals the answer. This is fair to every style because all four render() styles end with the
same `A: <answer>` line: verbose says "Therefore, the final answer is N." and then "A: N", latex
puts its steps in $$...$$ but writes the answer line as plain "A: N" (no \\boxed{}), coarse is one
line then "A: N". So no style is judged on a format it was not trained to write; the teacher-forced
exact-match eval of the trainer (which would score every misaligned style 0) is not used.
Held-out problems: the task's held-out split (expressions never in any training split), distinct
expressions, eval_n of them. Generation stops at EOS, at "\\nQ:" or after 256 new tokens.

Also reported: the final train loss (mean of the last three logged steps; per response token, so
not comparable across formats: verbose boilerplate is nearly free), the share of generated
responses in the target format (rl.rewards.target_format, the RL format reward), the align tool's
fidelity score of the generations against the reference set (align.compare dataset_score), which
style the generations take, and the wall time of each SFT run. Work files (data, runs, checkpoints,
generations, results.json) go to --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_ext.align.jsonl import write_jsonl  # noqa: E402
from megatron_ext.align.synth import make_traces  # noqa: E402
from megatron_ext.data.task import ArithmeticTask, extract_answer  # noqa: E402
from megatron_ext.rl.rewards import target_format, task_correct  # noqa: E402

MISALIGNED = ("verbose", "coarse", "latex")
OPS = dict(min_ops=1, max_ops=2, max_operand=9)  # the task; main() sets max_operand
TASK_SEED = 0
SEQ_LEN = 256
MAX_NEW_TOKENS = 256
STOP = ("\nQ:",)
MIN_TRACE_SCORE = 0.5
ARMS = {  # name -> (data file, gate on)
    "a": ("aligned (target)", "aligned", False),
    "b": ("misaligned (verbose/coarse/latex)", "misaligned", False),
    "c": ("mix, gated (filter)", "mix", True),
    "d": ("mix, no gate", "mix", False),
}
_COARSE = re.compile(r"-?\d+(?:[+\-*]-?\d+){2,}=-?\d+\nA: -?\d+\n?")


def write_data(d: str, n: int, ref_n: int) -> Dict[str, int]:
    """aligned / misaligned / mix training files over the same n problems, and the gate's
    reference: ref_n target-style traces of other training-split draws."""
    os.makedirs(d, exist_ok=True)
    by_style = {s: make_traces(n, s, seed=TASK_SEED, **OPS) for s in ("target",) + MISALIGNED}
    misaligned = [by_style[MISALIGNED[i % 3]][i] for i in range(n)]
    mix = [by_style["target"][i] if i % 2 == 0 else by_style[MISALIGNED[(i // 2) % 3]][i]
           for i in range(n)]
    train_prompts = {t["prompt"] for t in by_style["target"]}
    # other draws of the task (candidate indices from 10**6 on), not the training traces; not
    # filtered by expression: the train split has only ~220 one-operator expressions, all in the
    # training set, and a reference without them would teach the gate that one step is off-style
    ref = make_traces(ref_n, "target", seed=TASK_SEED, start=10 ** 6, **OPS)
    for name, records in (("aligned", by_style["target"]), ("misaligned", misaligned),
                          ("mix", mix), ("reference", ref)):
        write_jsonl(os.path.join(d, f"{name}.jsonl"), records)
    return {"train_problems": n, "distinct_train_prompts": len(train_prompts), "reference": len(ref),
            "reference_prompts_in_train": sum(t["prompt"] in train_prompts for t in ref)}


def overrides(args, data_path: str, run_dir: str, gate_ref: str = None) -> List[str]:
    o = ["model=tiny", "stage=sft", "data=jsonl", f"data.path={data_path}", "data.pack=false",
         f"train.seq_len={SEQ_LEN}", f"train.micro_batch_size={args.batch}",
         f"train.global_batch_size={args.batch}", f"train.steps={args.steps}",
         f"train.save_interval={args.steps}", "train.log_interval=10", "train.resume=none",
         "logging=none", f"run.dir={run_dir}", f"seed={args.seed}"]
    if gate_ref:
        o += ["data.fidelity_gate.enabled=true", f"data.fidelity_gate.reference={gate_ref}",
              "data.fidelity_gate.action=filter",
              f"data.fidelity_gate.min_trace_score={MIN_TRACE_SCORE}"]
    return o


def train(args, arm: str) -> Dict:
    label, data, gated = ARMS[arm]
    data_dir = os.path.join(args.out, "data")
    run_dir = os.path.join(args.out, "runs", arm)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    ovr = overrides(args, os.path.join(data_dir, f"{data}.jsonl"), run_dir,
                    os.path.join(data_dir, "reference.jsonl") if gated else None)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(args.threads))
    env.pop("MASTER_PORT", None)  # one process rendezvous in-process: no port to collide on
    started = time.perf_counter()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *ovr], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"arm {arm}: SFT exited {proc.returncode}; see {run_dir}/train.log")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in recs if "split" not in r and "loss" in r]
    used = _read(os.path.join(data_dir, f"{data}.jsonl"))
    gate = None
    if gated:  # the trainer trained on the gate's kept.jsonl
        fid = os.path.join(run_dir, "fidelity")
        used, rejected = _read(os.path.join(fid, "kept.jsonl")), _read(os.path.join(fid, "rejected.jsonl"))
        gate = {"kept": len(used), "rejected": len(rejected),
                "kept_by_style": dict(collections.Counter(r["style"] for r in used)),
                "rejected_by_style": dict(collections.Counter(r["style"] for r in rejected))}
    aligned = sum(target_format(r["response"], None) for r in used) / len(used)
    return {"arm": arm, "label": label, "overrides": ovr, "traces": len(used), "gate": gate,
            "aligned_share": aligned,
            "steps": args.steps, "final_loss": sum(losses[-3:]) / len(losses[-3:]),
            "wall_s": wall, "run_dir": run_dir}


def _read(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def heldout_problems(n: int):
    """n distinct held-out expressions of the task (the held-out split repeats expressions)."""
    seen, out = set(), []
    stream = ArithmeticTask(seed=TASK_SEED, **OPS).problems("heldout")
    for _, p in zip(range(100 * n), stream):
        if p.expression not in seen:
            seen.add(p.expression)
            out.append(p)
            if len(out) == n:
                return out
    raise SystemExit(f"--eval-n {n}: the held-out split of this task has only about {len(out)} "
                     "distinct expressions; lower --eval-n or raise --max-operand")


def style_of(text: str) -> str:
    """Which render() style a generated response takes (by its shape, right or wrong)."""
    if target_format(text, None):
        return "target"
    if text.startswith("Let us work through"):
        return "verbose"
    if text.startswith("$$"):
        return "latex"
    if _COARSE.fullmatch(text):
        return "coarse"
    return "other"


def evaluate(args, results: List[Dict]) -> None:
    """Greedy answers on the held-out problems from each arm's final checkpoint, in this process
    (TP=1), with the trainer's own config, model builder and weight loader."""
    from megatron_ext import compat
    from megatron_ext.align.compare import compare
    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.models.gpt import build_gpt_chunks
    from megatron_ext.rl.experience import PromptPool
    from megatron_ext.models.generate import SamplingParams, generate
    from megatron_ext.config.load import checked_config
    from megatron_ext.training import checkpoint
    from parallel import topology

    import torch
    torch.set_num_threads(args.threads)
    os.environ.pop("MASTER_PORT", None)  # in-process rendezvous (parallel.topology)
    cfg, dims = checked_config(results[0]["overrides"], 1)
    compat.setup()
    topo = topology.initialize(dims, seed=cfg.seed)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
        chunks = build_gpt_chunks(cfg, topo, vocab_size)
        problems = heldout_problems(args.eval_n)
        pool = PromptPool(problems, tokenizer)
        params = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, stop=STOP)
        reference = os.path.join(args.out, "data", "reference.jsonl")
        for r in results:
            root = os.path.join(r["run_dir"], "checkpoints")
            ckpt = checkpoint.list_checkpoints(root)[0][1]
            weights = checkpoint.CheckpointManager(
                root, topo, keep=1, sharded={"model": checkpoint.ModelPart(chunks)}, states={},
                shape=checkpoint.model_shape(cfg.model, vocab_size, chunks), log=print)
            problem = weights.verify(ckpt)
            if problem is not None:
                raise checkpoint.CheckpointError(f"{ckpt} is unusable: {problem}")
            weights.load(ckpt, only=("model",))
            started = time.perf_counter()
            texts = []
            for i in range(0, len(pool), args.gen_batch):
                out = generate(chunks, pool.prompts[i:i + args.gen_batch], tokenizer, params,
                               vocab_size=vocab_size, generator=None, tp_group=topo.tp_group,
                               pp_group=topo.pp_group)
                texts += out.texts
            correct = [task_correct(t, p) for t, p in zip(texts, problems)]
            styles = [style_of(t) for t in texts]
            gen_path = os.path.join(args.out, "generations", f"{r['arm']}.jsonl")
            write_jsonl(gen_path, [{"prompt": p.prompt, "response": t, "answer": p.answer,
                                    "correct": bool(c), "style": s}
                                   for p, t, c, s in zip(problems, texts, correct, styles)])
            by_ops = {}
            for k in (1, 2):
                hits = [c for c, p in zip(correct, problems) if len(p.steps) == k]
                by_ops[k] = {"n": len(hits), "accuracy": sum(hits) / max(len(hits), 1)}
            by_style = collections.defaultdict(list)
            for s, c in zip(styles, correct):
                by_style[s].append(c)
            r.update(eval_n=len(problems), accuracy=sum(correct) / len(problems),
                     answered=sum(extract_answer(t) is not None for t in texts) / len(texts),
                     by_ops=by_ops,
                     target_format=sum(target_format(t, None) for t in texts) / len(texts),
                     fidelity=compare(reference, gen_path).dataset_score,
                     gen_styles={s: {"n": len(v), "accuracy": sum(v) / len(v)}
                                 for s, v in sorted(by_style.items())},
                     gen_s=time.perf_counter() - started, checkpoint=ckpt)
            print(f"arm {r['arm']}: accuracy {r['accuracy']:.3f} ({r['gen_s']:.0f} s to generate)",
                  flush=True)
    finally:
        topology.destroy()


def table(results: List[Dict]) -> str:
    n1, n2 = (results[0]["by_ops"][k]["n"] for k in (1, 2))
    rows = ["| arm | traces trained on | aligned share | steps | final train loss | held-out answer accuracy "
            f"| 1-op ({n1}) | 2-op ({n2}) | has `A:` line | target format | fidelity score "
            "| generated styles: n (accuracy) | SFT wall s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        traces = f"{r['traces']:,}"
        if r["gate"]:
            traces += f" (kept of {r['gate']['kept'] + r['gate']['rejected']:,})"
        styles = ", ".join(f"{s} {v['n']} ({v['accuracy']:.0%})" for s, v in r["gen_styles"].items())
        rows.append(f"| ({r['arm']}) {r['label']} | {traces} | {r['aligned_share']:.0%} | {r['steps']} "
                    f"| {r['final_loss']:.3f} | **{r['accuracy']:.1%}** "
                    f"| {r['by_ops'][1]['accuracy']:.1%} | {r['by_ops'][2]['accuracy']:.1%} "
                    f"| {r['answered']:.0%} | {r['target_format']:.0%} | {r['fidelity']:.2f} "
                    f"| {styles} | {r['wall_s']:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-n", type=int, default=2000, help="training problems (every arm)")
    ap.add_argument("--eval-n", type=int, default=256, help="distinct held-out problems")
    ap.add_argument("--out", default="/tmp/format_alignment", help="work dir (data, runs, results)")
    ap.add_argument("--seed", type=int, default=1234, help="run seed (init, data order)")
    ap.add_argument("--batch", type=int, default=32, help="examples per step")
    ap.add_argument("--ref-n", type=int, default=200, help="reference traces for the gate")
    ap.add_argument("--gen-batch", type=int, default=128, help="prompts per generation batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1 is fastest on the shared 2-core machine)")
    ap.add_argument("--arms", default="a,b,c,d", help="subset of a,b,c,d")
    ap.add_argument("--max-operand", type=int, default=9,
                    help="operands 1..N (5: an easier task the tiny model learns in 200 steps)")
    args = ap.parse_args()
    OPS["max_operand"] = args.max_operand
    arms = args.arms.split(",")
    if any(a not in ARMS for a in arms):
        ap.error(f"--arms {args.arms}: each must be one of {list(ARMS)}")
    os.makedirs(args.out, exist_ok=True)
    data = write_data(os.path.join(args.out, "data"), args.train_n, args.ref_n)
    print(f"data: {data}", flush=True)
    results = []
    for arm in arms:
        r = train(args, arm)
        print(f"arm {arm}: trained on {r['traces']} traces, {r['steps']} steps, final loss "
              f"{r['final_loss']:.3f}, {r['wall_s']:.0f} s" + (f"; gate {r['gate']}" if r["gate"] else ""),
              flush=True)
        results.append(r)
    evaluate(args, results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"data": data, "args": vars(args), "results": results}, f, indent=1)
    print()
    print(table(results))


if __name__ == "__main__":
    main()
