"""Trainer overhead: tokens/s of our megatron-core trainer at TP=1 against a plain PyTorch loop
training the same GPT (RoPE, SwiGLU, RMSNorm, GQA, AdamW) on the same batches, in one process,
one run, the two loops alternating step by step. Prints a table with the ratio (goal >= 1.0).

    .venv/bin/python benchmarks/overhead.py [--steps 30] [--hidden 256] [--layers 4] [--seq 256]
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, base=10000.0):
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    emb = torch.cat([ang, ang], -1)[:, None, :]  # [s, 1, d] against [b, s, heads, d]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


class Block(nn.Module):
    def __init__(self, h, heads, groups, ffn):
        super().__init__()
        self.heads, self.groups, self.d = heads, groups, h // heads
        self.n1, self.n2 = RMSNorm(h), RMSNorm(h)
        self.qkv = nn.Linear(h, (heads + 2 * groups) * self.d, bias=False)
        self.proj = nn.Linear(h, h, bias=False)
        self.fc1, self.fc2 = nn.Linear(h, 2 * ffn, bias=False), nn.Linear(ffn, h, bias=False)

    def forward(self, x, pos):
        b, s, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).split(
            [self.heads * self.d, self.groups * self.d, self.groups * self.d], -1)
        q = rope(q.view(b, s, self.heads, self.d), pos).transpose(1, 2)
        k = rope(k.view(b, s, self.groups, self.d), pos).transpose(1, 2)
        v = v.view(b, s, self.groups, self.d).transpose(1, 2)
        rep = self.heads // self.groups
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        g, u = self.fc1(self.n2(x)).chunk(2, -1)
        return x + self.fc2(F.silu(g) * u)


class PlainGPT(nn.Module):
    def __init__(self, vocab, h, layers, heads, groups, ffn):
        super().__init__()
        self.emb = nn.Embedding(vocab, h)
        self.blocks = nn.ModuleList(Block(h, heads, groups, ffn) for _ in range(layers))
        self.norm, self.out = RMSNorm(h), nn.Linear(h, vocab, bias=False)

    def forward(self, tokens):
        pos = torch.arange(tokens.shape[1])
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, pos)
        return self.out(self.norm(x))


class PlainLoop:
    """The plain PyTorch training step, on the same batches as our trainer."""

    def __init__(self, args, vocab):
        torch.manual_seed(0)
        self.model = PlainGPT(vocab, args.hidden, args.layers, args.heads, args.groups, args.ffn)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95),
                                     weight_decay=0.01)

    def step(self, mbs) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        total = sum(b["loss_mask"].sum() for b in mbs)
        for b in mbs:
            logits = self.model(b["tokens"])
            loss = (F.cross_entropy(logits.float().flatten(0, 1), b["labels"].flatten(),
                                    reduction="none") * b["loss_mask"].flatten()).sum() / total
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return time.perf_counter() - start


def tokens_per_s(args, overrides):
    """(ours, plain, vocab, attention line): the two loops alternate step by step on the same
    global batches, so load from other jobs on the machine hits both alike."""
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import layer_spec
    from parallel import topology

    cfg = compose_config(overrides)
    dims = validate(cfg, 1)
    compat.setup()
    topo = topology.initialize(dims, seed=cfg.seed)
    from megatron_ext.train import build_loop
    recipe = build_loop(cfg, topo, args.run_dir).recipe
    sampler = type(recipe.sampler)(len(recipe.train_rows), args.gbs, args.mbs, 0, 1, cfg.seed)
    vocab = recipe.policy.modules()[0].vocab_size
    plain = PlainLoop(args, vocab)
    times = {"ours": [], "plain": []}
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        recipe.train_step(step)
        times["ours"].append(time.perf_counter() - start)
        batch = [recipe.train_rows.batch(ix) for ix in sampler.next_step()]
        times["plain"].append(plain.step(batch))
    topology.destroy()
    rate = {k: args.gbs * args.seq / (sum(t[args.warmup:]) / len(t[args.warmup:]))
            for k, t in times.items()}
    return rate["ours"], rate["plain"], vocab, layer_spec(cfg)[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=704)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=8)
    ap.add_argument("--gbs", type=int, default=16)
    ap.add_argument("--run-dir", default="/tmp/mext-overhead")
    ap.add_argument("--attention", default="auto", help="model.attention_backend of ours")
    args = ap.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    overrides = ["logging=none", f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
                 f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.groups}",
                 f"model.ffn_hidden_size={args.ffn}", f"train.seq_len={args.seq}",
                 f"train.micro_batch_size={args.mbs}", f"train.global_batch_size={args.gbs}",
                 f"train.steps={args.steps}", f"run.dir={args.run_dir}", "data.num_samples=4000",
                 f"model.attention_backend={args.attention}",
                 "data.isolate_documents=false"]  # as plain PyTorch's loop: causal attention
    ours, plain, vocab, attention = tokens_per_s(args, overrides)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.groups} "
          f"KV, ffn {args.ffn}, vocab {vocab}; seq {args.seq}, global batch {args.gbs}; "
          f"{torch.get_num_threads()} threads; mean of steps {args.warmup + 1}..{args.steps}, "
          f"the two loops alternating; ours: {attention}; load average {os.getloadavg()[0]:.1f}")
    print("| loop | tokens/s | ratio to plain PyTorch |")
    print("|---|---:|---:|")
    print(f"| plain PyTorch (SDPA, AdamW) | {plain:,.0f} | 1.00 |")
    print(f"| megatron-ext trainer, TP=1 | {ours:,.0f} | {ours / plain:.2f} |")


if __name__ == "__main__":
    main()
