"""fused_linear_cross_entropy against F.cross_entropy(hidden @ weight.T) in float64.

Every available backend (C++ extension, PyTorch reference) is checked on shapes whose token
count and vocab are not multiples of the tile, with ignored tokens, in all three reductions.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.ops import fused_linear_cross_entropy
from tests.unit.conftest import CPU_BACKENDS
REDUCTIONS = ["mean", "sum", "none"]
# (n tokens, h, vocab, block_rows, chunk_cols): ragged last tiles, one tile, tiny tiles
SHAPES = [(37, 16, 101, 8, 32), (130, 24, 517, 64, 128), (64, 8, 50, 64, 512), (5, 4, 3, 2, 2)]


def make_case(n, h, v, dtype=torch.float32, ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.2] = ignore_index
    return hidden, weight, labels


def reference(hidden, weight, labels, reduction, grad_out, ignore_index=-100):
    """Loss and (d_hidden, d_weight) of the materialised logits, in float64."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(h @ w.t(), labels, ignore_index=ignore_index, reduction=reduction)
    loss.backward(grad_out.double())
    return loss.detach(), h.grad, w.grad


def fused(hidden, weight, labels, reduction, grad_out, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, labels, reduction=reduction, **kw)
    loss.backward(grad_out.to(loss.dtype))
    return loss.detach(), h.grad, w.grad


def assert_close(actual, expected, rtol):
    """Max error relative to the largest reference magnitude (elementwise relative error is
    meaningless for gradient entries near zero)."""
    assert actual.shape == expected.shape
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"max error {err:.3g} > {rtol:g} * {scale:.3g}"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_cross_entropy_fp32(backend, shape, reduction):
    n, h, v, block_rows, chunk_cols = shape
    hidden, weight, labels = make_case(n, h, v)
    grad_out = torch.rand(n) if reduction == "none" else torch.tensor(1.7)
    want = reference(hidden, weight, labels, reduction, grad_out)
    got = fused(hidden, weight, labels, reduction, grad_out, block_rows=block_rows,
                chunk_cols=chunk_cols)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-5)
    if reduction == "none":
        assert torch.all(got[0][labels == -100] == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_custom_ignore_index_and_default_tiles(backend, reduction):
    hidden, weight, labels = make_case(300, 12, 5000, torch.float64, ignore_index=7, seed=1)
    grad_out = torch.rand(300, dtype=torch.float64) if reduction == "none" else torch.tensor(0.3)
    want = reference(hidden, weight, labels, reduction, grad_out, ignore_index=7)
    got = fused(hidden, weight, labels, reduction, grad_out, ignore_index=7)
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(backend, dtype):
    hidden, weight, labels = make_case(200, 32, 3000, dtype, seed=2)
    want = reference(hidden, weight, labels, "mean", torch.tensor(1.0))
    got = fused(hidden, weight, labels, "mean", torch.tensor(1.0), block_rows=64, chunk_cols=512)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert_close(got[0], want[0], rtol=1e-5)  # inputs are exact; only the sums could drift
    for g, w in zip(got[1:], want[1:]):
        assert_close(g, w, rtol=2e-2)  # one rounding of each gradient to the half dtype


def test_all_tokens_ignored(backend):
    hidden, weight, _ = make_case(9, 4, 11)
    labels = torch.full((9,), -100)
    loss, d_hidden, d_weight = fused(hidden, weight, labels, "sum", torch.tensor(1.0))
    assert loss.item() == 0 and not d_hidden.any() and not d_weight.any()
    assert torch.isnan(fused(hidden, weight, labels, "mean", torch.tensor(1.0))[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_padding_rows_never_enter_the_softmax(backend, reduction):
    """vocab_size < rows: the loss is F.cross_entropy over the real columns only, and the
    padding rows (random here, so a leak would show) get exactly zero gradient."""
    n, h, real, padded = 45, 8, 37, 64
    hidden, weight, labels = make_case(n, h, padded, seed=3)
    labels = torch.where(labels == -100, labels, labels % real)
    grad_out = torch.rand(n) if reduction == "none" else torch.tensor(0.9)
    want = reference(hidden, weight[:real], labels, reduction, grad_out)
    got = fused(hidden, weight, labels, reduction, grad_out, vocab_size=real, block_rows=16,
                chunk_cols=10)
    for g, w in zip(got[:2], want[:2]):
        assert_close(g, w, rtol=1e-5)
    assert_close(got[2][:real], want[2], rtol=1e-5)
    assert torch.count_nonzero(got[2][real:]) == 0
    assert got[2][:real].abs().min() > 0  # real rows do get gradient
    unpadded = fused(hidden, weight, labels, reduction, grad_out)[0]
    assert (unpadded - got[0]).abs().max() > 1e-2  # the padding would have changed the loss


@pytest.mark.parametrize("vocab_size", [0, 12])
def test_vocab_size_outside_the_rows_is_refused(vocab_size):
    with pytest.raises(ValueError, match=rf"vocab_size={vocab_size} must be in \[1, 11\]"):
        fused_linear_cross_entropy(*make_case(9, 4, 11), vocab_size=vocab_size)


def test_label_in_the_padding_is_refused():
    hidden, weight, labels = make_case(9, 4, 11)
    with pytest.raises(ValueError, match=r"\[0, 8\).*\[9\] at positions \[2\]"):
        fused_linear_cross_entropy(hidden, weight, labels.index_fill(0, torch.tensor([2]), 9),
                                   vocab_size=8)


@pytest.mark.parametrize(
    "bad, error, words",
    [
        (lambda h, w, y: (h, w, y.index_fill(0, torch.tensor([3]), 11)), ValueError,
         ["[0, 11)", "[11]", "[3]"]),
        (lambda h, w, y: (h, w, y.index_fill(0, torch.tensor([1]), -5)), ValueError,
         ["[-5]", "ignore_index=-100"]),
        (lambda h, w, y: (h, w[:, :3], y), ValueError, ["(11, 3)", "h = hidden.shape[1] = 4"]),
        (lambda h, w, y: (h, w, y[:8]), ValueError, ["[9]", "(8,)"]),
        (lambda h, w, y: (h[None], w, y), ValueError, ["2-D", "(1, 9, 4)"]),
        (lambda h, w, y: (h, w.double(), y), TypeError, ["torch.float32", "torch.float64"]),
        (lambda h, w, y: (h, w, y.float()), TypeError, ["integer", "torch.float32"]),
    ],
    ids=["label-too-big", "label-negative", "hidden-size", "labels-length", "hidden-3d",
         "dtype-mismatch", "float-labels"],
)
def test_bad_input_names_the_values(bad, error, words):
    hidden, weight, labels = bad(*make_case(9, 4, 11))
    with pytest.raises(error) as info:
        fused_linear_cross_entropy(hidden, weight, labels)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_bad_reduction_names_the_choices():
    with pytest.raises(ValueError, match="'avg'"):
        fused_linear_cross_entropy(*make_case(9, 4, 11), reduction="avg")


# Peak resident memory of one fwd+bwd, measured in a fresh process: VmHWM is reset through
# /proc/self/clear_refs before each run, so each figure is that run's own peak above the RSS
# it started from (torch's CPU allocations are invisible to tracemalloc).
PEAK_PROBE = textwrap.dedent(
    """
    import json, sys, torch, torch.nn.functional as F
    from megatron_ext.ops import fused_linear_cross_entropy, set_backend

    def kib(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key))

    torch.set_num_threads(1)  # short OpenMP regions crawl when other jobs hold the cores
    torch.manual_seed(0)
    n, v, h = 4096, 32768, 64
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / 8).requires_grad_()
    labels = torch.randint(0, v, (n,))
    runs = {"naive": lambda: F.cross_entropy(hidden @ weight.t(), labels).backward()}
    def fused(name):
        set_backend(name)
        fused_linear_cross_entropy(hidden, weight, labels).backward()

    for name in sys.argv[1:]:
        runs[name] = lambda name=name: fused(name)
    peaks = {}
    for name, run in runs.items():
        hidden.grad = weight.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = kib("VmRSS")
        run()
        peaks[name] = (kib("VmHWM") - start) * 1024
    print(json.dumps(peaks))
    """
)


def test_peak_memory_far_below_one_logits_tensor():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as err:
        pytest.skip(f"cannot reset the peak RSS counter here ({err})")
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE, *CPU_BACKENDS], capture_output=True,
                         text=True, timeout=300, check=True, cwd=Path(__file__).parents[2])
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 32768 * 4
    assert peaks["naive"] >= logits_bytes, f"probe did not see the naive logits: {peaks}"
    for name in CPU_BACKENDS:
        assert peaks[name] < logits_bytes / 10, f"{name} peak {peaks[name]} bytes: {peaks}"
