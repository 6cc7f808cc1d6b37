"""Our kernels against float64 PyTorch: fused linear cross-entropy (loss, d_hidden, d_weight) and
SwiGLU (forward, backward), fp32 and bf16, odd shapes that cross tile edges, plus a check that
bf16 tile products reach the fp32 gradient sums unrounded.

  python -m benchmarks.gpu.kernels            # on a GPU: the CUDA extension must serve
  python -m benchmarks.gpu.kernels --dry-run  # CPU, the C++ extension, tiny shapes
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from benchmarks.gpu.common import Table, device, parser, rel_err, verdict
from megatron_ext.ops import backend, fused_linear_cross_entropy, swiglu
from megatron_ext.ops._backend import kernels_for

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
# Mean relative error of the gradients against an fp64 emulation of the same tiles. bf16 tile
# products rounded to bf16 before their sum give ~1e-3 (emulated on CPU: 8 vocab chunks, 2 row
# blocks); fp32 sums ~2e-7. The tolerance sits between, with room for cuBLAS's order of sums.
SUM_TOL = 1e-4


def check_loss(table: Table, dev, dtype, n, h, v, tile) -> None:
    torch.manual_seed(0)
    hid = torch.randn(n, h, device=dev).to(dtype).requires_grad_()
    w = (torch.randn(v, h, device=dev) / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device=dev)
    y[::7] = -100
    loss = fused_linear_cross_entropy(hid, w, y, block_rows=tile[0], chunk_cols=tile[1])
    loss.backward()
    h64, w64 = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), y)
    ref.backward()
    shape = f"n={n} h={h} V={v} tile={tile[0]}x{tile[1]}"
    for name, got, want in (("loss", loss, ref), ("d_hidden", hid.grad, h64.grad),
                            ("d_weight", w.grad, w64.grad)):
        err = rel_err(got, want)
        table.add(f"fused CE {name}", str(dtype).split(".")[-1], shape, backend_of(hid),
                  f"{err:.2e}", verdict(err, TOL[dtype]))


def check_fp32_sums(table: Table, dev, n=1024, h=256, v=32768, tile=(512, 4096)) -> None:
    """d_hidden / d_weight of bf16 inputs against an fp64 emulation of the same tiles (logits
    and their gradient in the tile dtype, every sum exact, d_weight rounded once at the end as
    returned): only sums that never round a tile product to bf16 pass."""
    torch.manual_seed(0)
    bf = torch.bfloat16
    hid = torch.randn(n, h, device=dev).to(bf)
    w = (torch.randn(v, h, device=dev) * (3 / h**0.5)).to(bf)
    y = torch.randint(0, v, (n,), device=dev)
    kernels = kernels_for(hid)
    lse, _ = kernels.impl.ce_forward(hid, w, y, *tile)
    scale = torch.full((n,), 1.0 / n, device=dev)
    d_hidden, d_weight = kernels.impl.ce_backward(hid, w, y, lse, scale, *tile)
    tile_dtype = bf if kernels.name == "cuda" else torch.float32  # cpp/torch tiles are fp32
    logits = (hid.float() @ w.float().t()).to(tile_dtype).double()
    grad = (logits - lse.double()[:, None]).exp() * scale.double()[:, None]
    grad[torch.arange(n, device=dev), y] -= scale.double()
    grad = grad.to(tile_dtype).double()
    shape = f"n={n} h={h} V={v} tile={tile[0]}x{tile[1]}"
    exact_dw = (grad.t() @ hid.double()).to(d_weight.dtype)  # returned in weight's dtype
    for name, got, want in (("d_hidden", d_hidden, grad @ w.double()),
                            ("d_weight", d_weight, exact_dw)):
        got, want = got.double(), want.double()
        err = ((got - want).abs().mean() / want.abs().mean()).item()
        table.add(f"fp32 sums of bf16 tiles: {name} (mean err)", "bf16", shape, kernels.name,
                  f"{err:.2e}", verdict(err, SUM_TOL))


def check_swiglu(table: Table, dev, dtype, rows, d) -> None:
    torch.manual_seed(0)
    x = torch.randn(rows, 2 * d, device=dev).to(dtype).requires_grad_()
    dy = torch.randn(rows, d, device=dev).to(dtype)
    y = swiglu(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    a, b = x64.chunk(2, dim=-1)
    ref = F.silu(a) * b
    (ref_dx,) = torch.autograd.grad(ref, x64, dy.double())
    for name, got, want in (("swiglu fwd", y, ref), ("swiglu bwd", dx, ref_dx)):
        err = rel_err(got, want)
        table.add(name, str(dtype).split(".")[-1], f"rows={rows} d={d}", backend_of(x),
                  f"{err:.2e}", verdict(err, TOL[dtype]))


def backend_of(t: torch.Tensor) -> str:
    return kernels_for(t).name


def main() -> int:
    args = parser(__doc__).parse_args()
    dev = device(args.dry_run)
    table = Table(f"Kernels against float64 PyTorch ({dev.type})",
                  ["check", "dtype", "shape", "backend", "max rel err", "result"])
    want = "cpp" if args.dry_run else "cuda"
    served = backend()
    table.add("backend serving", "-", "-", served, "-",
              "ok" if served == want else f"FAIL (want {want}: is the extension built?)")
    big = (3001, 257, 50257, (1024, 8192)) if not args.dry_run else (301, 33, 1031, (64, 256))
    for dtype in (torch.float32, torch.bfloat16):
        check_loss(table, dev, dtype, *big)
        check_loss(table, dev, dtype, 5, 16, 127, (2, 50))  # every tile ragged
        check_swiglu(table, dev, dtype, 3, 1001)
        check_swiglu(table, dev, dtype, 4099 if not args.dry_run else 67, 96)
    if args.dry_run:
        check_fp32_sums(table, dev, n=256, h=32, v=2048, tile=(128, 256))
    else:
        check_fp32_sums(table, dev)
    return table.finish(args.out)


if __name__ == "__main__":
    sys.exit(main())
