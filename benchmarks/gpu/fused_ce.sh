#!/usr/bin/env bash
# On a GPU machine: build the CUDA extension, check it serves and matches PyTorch, then run
# the fused linear cross-entropy benchmark on device=cuda (plus Liger-Kernel's fused linear CE
# when it imports). Extra arguments go to the benchmark, e.g. --tokens 4096 --vocab 32768.
# Env: PYTHON (default python), HIDDEN (default 4096), DTYPE (bf16|fp16|fp32, default bf16).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python}"

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 'need a CUDA torch and a visible GPU')"
bash csrc/check_cuda.sh
"$PY" -m pip install -e . --no-build-isolation --no-deps   # builds _C and _C_cuda in place
"$PY" -c "import megatron_ext.ops as o, sys; print('backend:', o.backend()); sys.exit(0 if o.backend() == 'cuda' else 'CUDA extension did not build: read the WARNING line of the pip output')"

"$PY" - <<'PYEOF'
# Gate before timing: the CUDA kernels against float64 PyTorch, values and grads.
import torch, torch.nn.functional as F
from megatron_ext.ops import fused_linear_cross_entropy, swiglu

torch.manual_seed(0)
for dtype, tol in [(torch.float32, 1e-4), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)]:
    n, h, v = 3000, 256, 50257
    hid = torch.randn(n, h, device="cuda").to(dtype).requires_grad_()
    w = (torch.randn(v, h, device="cuda") / h**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), device="cuda")
    y[::5] = -100
    loss = fused_linear_cross_entropy(hid, w, y, block_rows=1024, chunk_cols=8192)
    loss.backward()
    h64, w64 = hid.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), y)
    ref.backward()
    for name, got, want in [("loss", loss, ref), ("d_hidden", hid.grad, h64.grad),
                            ("d_weight", w.grad, w64.grad)]:
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < tol, f"{dtype} {name}: relative error {err:.3g} >= {tol}"
    x = torch.randn(64, 2 * 1000, device="cuda").to(dtype).requires_grad_()
    dy = torch.randn(64, 1000, device="cuda").to(dtype)
    (dx,) = torch.autograd.grad(swiglu(x), x, dy)
    x64 = x.detach().double().requires_grad_()
    a, b = x64.chunk(2, dim=-1)
    (ref_dx,) = torch.autograd.grad(F.silu(a) * b, x64, dy.double())
    assert (dx.double() - ref_dx).abs().max().item() < tol * ref_dx.abs().max().item(), dtype
    print(f"gate ok: {dtype}")
PYEOF

"$PY" -m benchmarks.fused_ce --device cuda --hidden "${HIDDEN:-4096}" --dtype "${DTYPE:-bf16}" \
  --liger "$@"
