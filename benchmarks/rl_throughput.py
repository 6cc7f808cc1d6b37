"""GRPO rollout+train throughput: our RL loop (`stage=rl rl=grpo`, one process, TP=1) against
TRL's `GRPOTrainer` on a model of the same shape, the same prompts and the same settings, on
this CPU, one after the other in the same command. Prints a markdown table with the ratio
ours/TRL (issue goal: >= 2.0x).

    .venv/bin/python benchmarks/rl_throughput.py [--steps 8] [--warmup 2] [--rounds 3] \
        [--prompts-per-step 16] [--max-new-tokens 32] [--threads 2] [--trl-venv .venv-trl]

What is compared. Both sides run G=8 samples per prompt, `--prompts-per-step` prompts per step,
the same `--max-new-tokens`, temperature 1.0, top-p 1, no top-k, one optimizer update per
rollout batch on the whole batch (one micro-batch), clip 0.2/0.28, token-mean loss (TRL
loss_type="dapo"), group-std advantages, no KL and so no reference model (kl_coef=0 / beta=0),
AdamW (lr, betas 0.9/0.95, weight decay 0.01, grad clip 1.0), constant LR, fp32, no gradient
checkpointing on TRL's side (ours runs its defaults, as a user gets them), our difficulty filter
off (rl.band_low=0 rl.band_high=1: every sampled group is trained, as in TRL), the same thread
count (OMP_NUM_THREADS and torch.set_num_threads). Ours: megatron GPTModel `model=tiny`
(4 layers, hidden 64, 4 heads, 2 KV groups, SwiGLU 128, RoPE, RMSNorm, untied embeddings, vocab
259 bytes+specials padded to 384). TRL: a `LlamaForCausalLM` of exactly that shape (vocab 384),
with a byte-level tokenizer whose ids are ours (byte b -> id b, <bos> 256, <eos> 257, <pad> 258,
unused special tokens up to 384), generating with `transformers` generate (no vLLM). Prompts are
our RL prompt pool's (`ArithmeticTask` train problems, "Q: <expr>\\n" after <bos>); the reward
is our verifier (`megatron_ext/data/task.py`, loaded by path in the TRL venv).

Why both start near random. TRL's model is randomly initialised; ours must start from an SFT
checkpoint, so the script makes one with a single SFT step (loss still ~ln 384). Both policies
then sample near-uniform tokens, EOS is rare, and almost every response runs to
max-new-tokens: the same (worst) generation work on both sides, and the reported mean completion
lengths show it. A trained model would stop early and flatter whichever side it ran on. The
rewards are then all 0 (zero advantages), which changes no compute: both sides still run the
full forward, backward and optimizer step.

Timing: `--rounds` runs per side, alternating ours and TRL (ours, TRL, TRL, ours, ...), each
run a fresh process; only the steps after `--warmup` of each run count. Ours: the trainer's
`step_time_s` per GRPO step in metrics.jsonl (rollout, scoring, advantages, update). TRL: a TrainerCallback's on_step_begin ->
on_step_end (generation, scoring, loss, backward, optimizer step). Tokens/s counts prompt plus
completion tokens per step: prompts x G x (mean prompt length of the pool, <bos> included, +
measured mean completion length), over the MEDIAN step time of all timed steps: on a 2-core
machine shared with other jobs, single steps stall for seconds when another process takes the
cores; the median ignores those stalls and the alternating rounds spread the load over both
sides. The table shows the mean and the minimum beside it; the per-round ratios are printed.
On a 2-core machine where another job is running, 2 threads per side (the default) make single
steps 10 to 30 times slower, on both sides and at random (OpenMP threads wait on a thread that
has no core); there `--threads 1` gives stable figures (docs/results_rl.md).

The TRL side runs in its own venv (`--trl-venv`, default .venv-trl), created when missing with
CPU torch first (the version of this venv's torch) and then trl, transformers, accelerate,
datasets. This file is also the TRL worker (`--trl-worker SPEC.json`, run by that venv's python;
it imports nothing of ours but task.py by path).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_PADDED = 384  # 259 = 256 bytes + BOS/EOS/PAD, padded to a multiple of 128 (tp=1)
BOS, EOS, PAD = 256, 257, 258
TRL_PACKAGES = ["trl", "transformers", "accelerate", "datasets"]


# ---------------------------------------------------------------------------------------------
# TRL worker (runs in the TRL venv: no megatron, no megatron_ext package import)
# ---------------------------------------------------------------------------------------------
def _load_task_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "_task", os.path.join(ROOT, "megatron_ext", "data", "task.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["_task"] = module  # dataclasses looks the module up by name
    spec.loader.exec_module(module)
    return module


def _byte_tokenizer():
    """A PreTrainedTokenizerFast with our ByteTokenizer's ids: byte b -> b, then <bos> <eos>
    <pad>, then unused special tokens up to the padded vocab (so the model's 384 rows all have
    a token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    byte_to_char = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins, one per byte
    # the GPT-2 byte->unicode table, to put byte b at id b
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = {b: chr(c) for b, c in zip(bs, cs)}
    assert set(table.values()) == set(byte_to_char)
    vocab = {table[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>", "<pad>"] + [f"<unused_{i}>" for i in range(VOCAB_PADDED - 259)]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")
    assert fast.convert_tokens_to_ids(["<bos>", "<eos>", "<pad>"]) == [BOS, EOS, PAD]
    assert len(fast) == VOCAB_PADDED
    return fast


def llama_config(m: dict):
    """A LlamaConfig of the shape `m` (tiny_shape's fields) with our byte token ids."""
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=VOCAB_PADDED, hidden_size=m["hidden_size"],
        intermediate_size=m["ffn_hidden_size"], num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_attention_heads"], num_key_value_heads=m["num_query_groups"],
        head_dim=m["hidden_size"] // m["num_attention_heads"], hidden_act="silu",
        max_position_embeddings=4096, rms_norm_eps=m["norm_epsilon"],
        rope_parameters={"rope_type": "default", "rope_theta": float(m["rotary_base"])},
        tie_word_embeddings=m["tie_embeddings"], attention_bias=False, mlp_bias=False,
        initializer_range=m["init_method_std"], bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD)


def tiny_shape() -> dict:
    """The `tiny` preset's shape fields (configs/model/tiny.yaml over the schema defaults)."""
    from megatron_ext.config.schema import ModelConfig
    from omegaconf import OmegaConf
    m = ModelConfig()
    tiny = OmegaConf.load(os.path.join(ROOT, "configs", "model", "tiny.yaml"))
    return {k: tiny.get(k, getattr(m, k)) for k in (
        "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
        "ffn_hidden_size", "rotary_base", "norm_epsilon", "tie_embeddings", "init_method_std")}


def trl_worker(spec_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch
    torch.set_num_threads(spec["threads"])
    import datasets
    import transformers
    import trl
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task = _load_task_module()
    tokenizer = _byte_tokenizer()
    ids = tokenizer(spec["prompts"][0])["input_ids"]
    assert ids == [BOS] + list(spec["prompts"][0].encode()), ids  # same ids as our pool's

    torch.manual_seed(spec["seed"])
    config = llama_config(spec["model"])
    model = LlamaForCausalLM(config).float()
    params = sum(p.numel() for p in model.parameters())

    answers = spec["answers"]
    data = datasets.Dataset.from_dict({"prompt": spec["prompts"], "answer": answers})

    def task_correct(prompts, completions, answer, **kwargs):
        return [1.0 if task.extract_answer(c) == a else 0.0 for c, a in zip(completions, answer)]

    s = spec["settings"]
    batch = s["prompts_per_step"] * s["group_size"]
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
        max_steps=s["warmup"] + s["steps"], seed=spec["seed"], dataloader_num_workers=0,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1,
        num_generations=s["group_size"], max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=1.0, top_k=0, use_vllm=False,
        beta=0.0, num_iterations=1, epsilon=s["eps_low"], epsilon_high=s["eps_high"],
        loss_type="dapo", scale_rewards="group", mask_truncated_completions=False,
        learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=s["weight_decay"], adam_beta1=s["adam_beta1"], adam_beta2=s["adam_beta2"],
        adam_epsilon=s["adam_eps"], max_grad_norm=s["clip_grad"], log_completions=False)
    assert args.generation_batch_size == batch and args.steps_per_generation == 1

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.steps, self.logs = None, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.logs.append(dict(logs, step=state.global_step))

    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=task_correct, args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    result = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                           "torch": torch.__version__},
              "params": params, "step_times": timer.steps, "logs": timer.logs,
              "threads": torch.get_num_threads()}
    json.dump(result, open(spec["result"], "w"), indent=1)


# ---------------------------------------------------------------------------------------------
# Orchestration (runs in our venv)
# ---------------------------------------------------------------------------------------------
def _run(cmd, env, log_path, what):
    print(f"[{what}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = open(log_path).read()[-3000:]
        sys.exit(f"[{what}] failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    print(f"[{what}] done in {time.perf_counter() - start:.0f} s (log {log_path})", flush=True)


def ensure_trl_venv(venv: str) -> str:
    python = os.path.join(venv, "bin", "python")
    check = [python, "-c", "import trl, transformers, accelerate, datasets, torch"]
    if os.path.exists(python) and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    import torch  # pin the TRL venv's torch to ours: a CPU build, never a CUDA one
    pin = f"torch=={torch.__version__.split('+')[0]}"
    steps = [[sys.executable, "-m", "venv", venv],
             [python, "-m", "pip", "install", "-q", pin],
             [python, "-m", "pip", "install", "-q", pin, *TRL_PACKAGES]]
    if os.path.exists(python):
        steps = steps[1:]
    print(f"creating the TRL venv {venv} (CPU torch first, then {' '.join(TRL_PACKAGES)}):")
    for cmd in steps:
        print("  " + " ".join(cmd), flush=True)
        if subprocess.run(cmd).returncode:
            sys.exit(f"failed: {' '.join(cmd)}; run the commands above by hand "
                     f"(python3.11 needed; torch must stay {pin}, a CPU build)")
    return python


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per side and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, in every run")
    p.add_argument("--rounds", type=int, default=3,
                   help="runs per side, alternating ours and TRL")
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=2000, help="size of the prompt pool")
    p.add_argument("--trl-venv", default=os.path.join(ROOT, ".venv-trl"))
    p.add_argument("--workdir", default=os.path.join(ROOT, "outputs",
                                                     f"rl_throughput-{time.strftime('%Y%m%d-%H%M%S')}"))
    p.add_argument("--only", choices=("ours", "trl"), help="run one side only")
    p.add_argument("--trl-worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        return trl_worker(args.trl_worker)

    sys.path.insert(0, ROOT)
    from megatron_ext.config.schema import TrainConfig
    from megatron_ext.data.task import ArithmeticTask
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.rl.experience import PromptPool

    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    max_operand, seed = 5, 1234  # the demo's task (operands 1..5) and the config's seed
    P, G, N = args.prompts_per_step, args.group_size, args.max_new_tokens

    # the prompts, exactly as our RL prompt pool renders them
    task = ArithmeticTask(0, 1, 2, max_operand)
    problems = task.take(args.num_prompts, "train")
    pool = PromptPool(problems, ByteTokenizer())
    prompt_len = sum(len(x) for x in pool.prompts) / len(pool.prompts)  # <bos> included

    python = None
    if args.only != "ours":
        python = ensure_trl_venv(args.trl_venv)  # before any timing

    common = [f"data.task.max_operand={max_operand}", "logging=none", "parallel.tp=1",
              "parallel.pp=1", "model=tiny", "train.eval_samples=8"]
    init = None
    if args.only != "trl":
        sft = os.path.join(args.workdir, "sft")
        _run([sys.executable, "-m", "megatron_ext.train", "train=demo", *common,
              "train.steps=1", "train.save_interval=1", f"run.dir={sft}"],
             env, os.path.join(args.workdir, "sft.log"), "ours: 1-step SFT checkpoint")
        init = os.path.join(sft, "checkpoints", open(os.path.join(sft, "checkpoints",
                                                                  "latest")).read().strip())

    def run_ours(k: int) -> dict:
        run_dir = os.path.join(args.workdir, f"ours_{k}")
        _run([sys.executable, "-m", "megatron_ext.train", "stage=rl", "rl=grpo",
              f"rl.init_checkpoint={init}", *common, f"data.num_samples={args.num_prompts}",
              f"train.steps={args.warmup + args.steps}", f"train.lr={args.lr}",
              f"train.min_lr={args.lr}", "train.warmup_steps=0", "train.lr_decay_style=constant",
              "train.log_interval=1", f"train.micro_batch_size={P * G}",
              f"train.global_batch_size={P * G}", "rl.band_low=0", "rl.band_high=1",
              f"rl.group_size={G}", f"rl.prompts_per_step={P}", f"rl.max_new_tokens={N}",
              "rl.temperature=1.0", "rl.top_p=1.0", "rl.kl_coef=0", "rl.eps_low=0.2",
              "rl.eps_high=0.28", "rl.loss_agg=token-mean", "rl.ppo_epochs=1",
              "rl.mini_batches=1", "rl.eval_interval=0", f"run.dir={run_dir}"],
             env, run_dir + ".log", f"round {k}, ours: GRPO")
        recs = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
        steps = [r for r in recs if "split" not in r and r["step"] > args.warmup]
        assert all(r["groups_kept"] == P and r["updates"] == 1 for r in steps), steps
        return {"label": "ours (megatron-core GRPO, TP=1)",
                "times": [r["step_time_s"] for r in steps],
                "rollout": [r["rollout_time_s"] for r in steps],
                "completion": [r["response_len"] for r in steps],
                "truncated": [r["truncated_frac"] for r in steps]}

    model = tiny_shape()
    t = TrainConfig()
    settings = {"prompts_per_step": P, "group_size": G, "max_new_tokens": N, "temperature": 1.0,
                "eps_low": 0.2, "eps_high": 0.28, "lr": args.lr, "weight_decay": t.weight_decay,
                "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2, "adam_eps": t.adam_eps,
                "clip_grad": t.clip_grad, "warmup": args.warmup, "steps": args.steps}

    def run_trl(k: int) -> dict:
        spec = {"threads": args.threads, "seed": seed, "model": model, "settings": settings,
                "prompts": [x.prompt for x in problems], "answers": [x.answer for x in problems],
                "out_dir": os.path.join(args.workdir, f"trl_{k}"),
                "result": os.path.join(args.workdir, f"trl_{k}.json")}
        spec_path = os.path.join(args.workdir, f"trl_{k}_spec.json")
        json.dump(spec, open(spec_path, "w"))
        _run([python, os.path.abspath(__file__), "--trl-worker", spec_path], env,
             os.path.join(args.workdir, f"trl_{k}.log"), f"round {k}, TRL: GRPOTrainer")
        res = json.load(open(spec["result"]))
        logs = [r for r in res["logs"] if r["step"] > args.warmup]
        assert len(logs) == args.steps and res["threads"] == args.threads, res
        return {"label": f"TRL {res['versions']['trl']} GRPOTrainer "
                         f"(transformers {res['versions']['transformers']})",
                "times": res["step_times"][args.warmup:],
                "completion": [r["completions/mean_length"] for r in logs],
                "truncated": [r["completions/clipped_ratio"] for r in logs]}

    # alternate the sides, round by round, so that both meet the same load from other jobs
    runners = {"ours": run_ours, "trl": run_trl}
    sides = [s for s in runners if args.only in (None, s)]
    results, rounds = {}, []
    for k in range(1, args.rounds + 1):
        medians = {}
        for side in (sides if k % 2 else sides[::-1]):
            got = runners[side](k)
            medians[side] = statistics.median(got["times"])
            agg = results.setdefault(side, {"label": got["label"], "times": [],
                                            "completion": [], "truncated": []})
            for key in got.keys() - {"label"}:
                agg[key] = agg.get(key, []) + got[key]
        rounds.append(medians)
        print(f"round {k}: median s/step " + ", ".join(f"{s} {v:.2f}" for s, v in medians.items())
              + (f", ratio ours/TRL {medians['trl'] / medians['ours']:.2f}x"
                 if len(medians) == 2 else ""), flush=True)
    for r in results.values():
        r["n"] = len(r["times"])
        r["completion"] = statistics.mean(r["completion"])
        r["truncated"] = statistics.mean(r["truncated"])

    for r in results.values():
        r["s_median"], r["s_mean"] = statistics.median(r["times"]), statistics.mean(r["times"])
        r["s_min"] = min(r["times"])
        r["tok_s"] = P * G * (prompt_len + r["completion"]) / r["s_median"]
    print(f"\nGRPO rollout+train throughput, {P} prompts x G={G} per step, max {N} new tokens, "
          f"temperature 1.0, one update per batch, no KL, {args.threads} threads, "
          f"mean prompt {prompt_len:.1f} tokens (<bos> included)\n")
    print("| run | steps timed | prompts x G per step | mean completion tokens "
          "| truncated at max | s/step median (mean, min) | tokens/s (prompt+completion) "
          "| ratio to TRL |")
    print("|---|---|---|---|---|---|---|---|")
    base = results.get("trl", {}).get("tok_s")
    for r in results.values():
        ratio = f"{r['tok_s'] / base:.2f}x" if base else "-"
        print(f"| {r['label']} | {r['n']} | {P} x {G} | {r['completion']:.1f} "
              f"| {r['truncated']:.0%} | {r['s_median']:.2f} ({r['s_mean']:.2f}, {r['s_min']:.2f}) "
              f"| {r['tok_s']:,.0f} | {ratio} |")
    if "rollout" in results.get("ours", {}):
        r = results["ours"]
        gen = statistics.median(r["rollout"])
        print(f"\nours, median per step: rollout (generation, scoring) {gen:.3f} s, the rest "
              f"(advantages, update) {r['s_median'] - gen:.3f} s "
              f"({gen / r['s_median']:.0%} rollout)")
    if len(rounds) > 1 and all(len(r) == 2 for r in rounds):
        print("\nratio ours/TRL of the median step times, round by round: "
              + ", ".join(f"{r['trl'] / r['ours']:.2f}x" for r in rounds))
    json.dump({"results": results, "rounds": rounds}, open(
        os.path.join(args.workdir, "results.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
