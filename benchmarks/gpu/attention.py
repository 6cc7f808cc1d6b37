"""Attention: every `model.attention_backend` against `local` (megatron's unfused attention)
through the config override on a small GPT (logits and the QKV weight's gradient, fp32 and
bf16), then causal fwd+bwd TFLOPS per kernel at 8K-64K tokens (GQA 32/8 heads, head dim 128).

  python -m benchmarks.gpu.attention            # on a GPU
  python -m benchmarks.gpu.attention --dry-run  # CPU, tiny shapes

A backend this tree does not know (no model.attention_backend key, or a value it refuses) is a
FAIL row naming the error; flash and te rows say `skip` only when their package does not import.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import Table, best_seconds, device, parser, rel_err, verdict
from megatron_ext import compat

PARITY_TOL = {"fp32": 1e-5, "bf16": 2e-2}
OPTIONAL = {"flash": "flash_attn", "te": "transformer_engine"}
DEFAULT_KERNELS = ("sdpa (default)", "flash-attn")  # what the model's backends run


def _why(err: Exception) -> str:
    """One table cell: the error's type and the start of its message, on one line."""
    return f"{type(err).__name__}: " + " ".join(str(err).split())[:200].replace("|", "/")


def _model(overrides, topo, vocab):
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import build_gpt_chunks

    cfg = compose_config(overrides)
    validate(cfg, 1)
    return build_gpt_chunks(cfg, topo, vocab)[0]


def _fwd_bwd(model, tokens):
    """(logits, grad of the first layer's QKV weight) for one causal LM step."""
    model.zero_grad(set_to_none=True)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, None)
    F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    return logits.detach().float(), qkv.grad.detach().float().clone()


def parity(table: Table, topo, dry_run: bool) -> None:
    seq = 64 if dry_run else 512
    vocab = 512
    for dtype in ("fp32", "bf16"):
        base = ["logging=none", "model=tiny", f"model.dtype={dtype}", f"train.seq_len={seq}",
                "model.num_attention_heads=4", "model.num_query_groups=2", "model.hidden_size=128",
                "model.kv_channels=32"]
        torch.manual_seed(0)
        tokens = torch.randint(0, vocab, (2, seq), device=topo.device)
        try:
            ref_model = _model(base + ["model.attention_backend=local"], topo, vocab)
        except Exception as err:  # noqa: BLE001 - any failure is this row's result
            table.add("local (reference)", dtype, "-", "-", f"FAIL ({_why(err)})")
            continue
        ref_logits, ref_grad = _fwd_bwd(ref_model, tokens)
        for backend in ("sdpa", "flash", "te", "auto"):
            if backend in OPTIONAL and not compat.has_module(OPTIONAL[backend]):
                table.add(backend, dtype, "-", "-", f"skip ({OPTIONAL[backend]} does not import)")
                continue
            try:
                model = _model(base + [f"model.attention_backend={backend}"], topo, vocab)
                model.load_state_dict(ref_model.state_dict())
                logits, grad = _fwd_bwd(model, tokens)
            except Exception as err:  # noqa: BLE001
                table.add(backend, dtype, "-", "-", f"FAIL ({_why(err)})")
                continue
            e_logits, e_grad = rel_err(logits, ref_logits), rel_err(grad, ref_grad)
            table.add(backend, dtype, f"{e_logits:.1e}", f"{e_grad:.1e}",
                      verdict(max(e_logits, e_grad), PARITY_TOL[dtype]))


def _kernels(dev):
    """name -> (q, k, v [b, s, h, d]) -> out, for the kernels that run here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend) if backend is not None else _nothing():
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                     v.transpose(1, 2), is_causal=True,
                                                     enable_gqa=True)
            return out.transpose(1, 2)
        return run

    kernels = {"sdpa (default)": sdpa(None), "sdpa math (materialised, like local)":
               sdpa(SDPBackend.MATH)}
    if dev.type == "cuda":
        kernels |= {"sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
                    "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
                    "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
        if compat.has_module("flash_attn"):
            from flash_attn import flash_attn_func
            kernels["flash-attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    return kernels


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def throughput(table: Table, dev, dry_run: bool) -> None:
    b, hq, hkv, d = (1, 4, 2, 16) if dry_run else (1, 32, 8, 128)
    seqs = (256, 512) if dry_run else (8192, 16384, 32768, 65536)
    math_limit = 512 if dry_run else 16384  # the math path holds [b, h, s, s] scores
    dtype = torch.float32 if dry_run else torch.bfloat16
    for name, fn in _kernels(dev).items():
        for s in seqs:
            if "math" in name and s > math_limit:
                table.add(name, s, "-", "-", f"skip (holds [b, h, s, s]: {s}^2 scores per head)")
                continue
            q = torch.randn(b, s, hq, d, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, requires_grad=True)
            grad = torch.randn(b, s, hq, d, device=dev, dtype=dtype)

            def step():
                fn(q, k, v).backward(grad)

            try:
                seconds = best_seconds(step, dev, reps=1 if dry_run else 3)
            except RuntimeError as err:
                # a forced SDPA kernel that has no implementation for this shape (GQA, head
                # dim) is information, not a failure: the model runs sdpa's own choice
                refused = "No available kernel" in str(err) and name not in DEFAULT_KERNELS
                table.add(name, s, "-", "-", f"{'skip' if refused else 'FAIL'} ({_why(err)})")
                continue
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            # causal: half of the 4*s^2*d*h fwd matmul flops; bwd 2.5x fwd
            flops = 3.5 * 2 * b * hq * s * s * d
            table.add(name, s, f"{seconds * 1e3:.2f}", f"{flops / seconds / 1e12:.3g}", "ok")


def main() -> int:
    args = parser(__doc__).parse_args()
    dev = device(args.dry_run)
    compat.setup()
    from parallel import topology
    from parallel.topology import ParallelDims

    topo = topology.initialize(ParallelDims(world_size=1, tp=1, pp=1, cp=1), seed=0)
    try:
        checks = Table(f"Attention backends against local, tiny GPT ({dev.type})",
                       ["model.attention_backend", "dtype", "logits rel err", "dQKV rel err",
                        "result"])
        parity(checks, topo, args.dry_run)
        speed = Table(f"Causal attention fwd+bwd ({dev.type})",
                      ["kernel", "seq", "ms", "TFLOP/s", "result"])
        throughput(speed, dev, args.dry_run)
    finally:
        topology.destroy()
    return max(checks.finish(args.out), speed.finish(args.out))


if __name__ == "__main__":
    sys.exit(main())
