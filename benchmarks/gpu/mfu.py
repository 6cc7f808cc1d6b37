"""MFU of the `1b` preset on one GPU: bf16, seq 4096, 20 steps, fused loss and SwiGLU on, from
the trainer's own tokens/s (steps 6-20; the first ones compile and warm up).

Model FLOPs per token (training = 3x forward, no recompute counted): 6 * N + 6 * L * s * hq * d,
N the parameters that multiply each token (attention and MLP projections, and the output
layer even when tied), the second term causal attention (QK^T and AV over half the
positions). Peak: the card's dense bf16 tensor-core rate.

  python -m benchmarks.gpu.mfu --run-dir /tmp/mfu            # on a GPU
  python -m benchmarks.gpu.mfu --run-dir /tmp/mfu --dry-run  # CPU, the tiny preset, 3 steps
"""
from __future__ import annotations

import statistics
import sys

from benchmarks.gpu.common import Table, last_line, parser, run_train

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, SXM parts


def flops_per_token(overrides, seq: int) -> tuple[float, float]:
    """(training FLOPs per token, parameters N that multiply each token) for a preset."""
    from megatron_ext.config.load import compose_config

    m = compose_config(overrides).model
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    h, hq, hkv, L = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.num_layers
    vocab = m.vocab_size or 256
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * m.ffn_hidden_size
    n = L * per_layer + vocab * h
    return 6 * n + 6 * L * seq * hq * d, n


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--run-dir", required=True)
    args = p.parse_args()
    if args.dry_run:
        preset, seq, steps, mbs, gbs = "tiny", 64, 3, 2, 4
        dtype, name, peak = "fp32", "cpu", None
    else:
        import torch

        preset, seq, steps, mbs, gbs = "1b", 4096, 20, 2, 16
        dtype, name = "bf16", torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    model = [f"model={preset}", f"model.dtype={dtype}"]
    run = run_train(model + ["model.fused_loss=true", "model.fused_swiglu=true",
                             f"train.seq_len={seq}", f"train.steps={steps}",
                             f"train.micro_batch_size={mbs}", f"train.global_batch_size={gbs}",
                             "train.log_interval=1", "train.warmup_steps=0",
                             "train.eval_samples=1", "logging.nvml_interval=0",
                             "data.isolate_documents=false"],  # the causal FLOPs counted above
                    args.run_dir, 540, args.dry_run)
    table = Table(f"MFU, {preset} preset, {dtype}, seq {seq}, {gbs} x {seq} tokens/step ({name})",
                  ["params N", "model TFLOP/token", "tokens/s", "achieved TFLOP/s", "peak TFLOP/s",
                   "MFU", "result"])
    fpt, n = flops_per_token(model, seq)
    rates = [r["tokens_per_s"] for r in run["metrics"] if "split" not in r][min(5, steps - 1):]
    if run["code"] != 0 or not rates:
        table.add(f"{n / 1e9:.2f}B", f"{fpt / 1e12:.2e}", "-", "-", "-", "-",
                  f"FAIL (exit {run['code']}: {last_line(run['output'])})")
    else:
        tok_s = statistics.median(rates)
        achieved = tok_s * fpt
        table.add(f"{n / 1e9:.2f}B", f"{fpt / 1e12:.2e}", f"{tok_s:,.0f}",
                  f"{achieved / 1e12:.1f}", f"{peak / 1e12:.0f}" if peak else "n/a",
                  f"{achieved / peak:.1%}" if peak else "n/a (no peak known for this card)", "ok")
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
