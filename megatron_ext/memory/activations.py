"""What one micro-batch keeps for backward, block by block, and what each block needs on top
while it runs.

Korthikanti et al. (arXiv 2205.05198) count s*b*h*(34 + 5*a*s/h) bytes per layer (over t with
tensor and sequence parallelism) for a GPT with LayerNorm, GeLU (4h MLP), dropout masks and
fp16 scores. Our model differs, and the
tensors below are the ones autograd really saves in megatron-core 0.16.1 (listed with a
saved-tensor hook on the built model):
  - RMSNorm (torch's composite rms_norm under the local spec) computes in fp32 and keeps its
    fp32 input, the fp32 normalised x and the per-token rsqrt; the next linear keeps the
    output. TE's fused norm keeps its input, its output and rsqrt.
  - SwiGLU: fc1 gives 2*ffn; megatron's glu keeps that, silu(gate), (up + 0) and their product
    (5*ffn). The fused swiglu recomputes and keeps 3*ffn.
  - GQA: flash/TE and ring attention keep K and V at num_query_groups heads; the local
    DotProductAttention repeats them to all heads first and keeps the repeated copies. V is a
    view into the fused QKV output, so wherever V itself is kept, the whole QKV output is.
  - No dropout (hidden_dropout = attention_dropout = 0): no masks. No biases.
  - Local attention materialises [b, np, s, s] scores: it keeps the fp32 softmax (and its
    bf16 copy in bf16) and a causal [s, s] bool mask per layer, and needs three more fp32
    score-sized tensors in backward (softmax grad and two copies from the in-place mask on a
    view). Flash/TE keeps the log-sum-exp instead; ring attention too, and its backward
    recomputes the scores block by block. Context parallelism divides s by cp.
  - Loss: megatron's vocab-parallel cross-entropy turns fp32 logits [s*b, v/t] into the
    softmax in place and reuses it for the gradient; in bf16 the bf16 logits and their bf16
    gradient come on top. The fused linear cross-entropy keeps no [s*b, v/t] tensor.
"""
from __future__ import annotations

import dataclasses
from typing import List

from megatron_ext.memory.model_terms import ModelShape

FP32 = 4
FUSED_CE_TILE = 4096 * 16384  # logits tile of megatron_ext.ops' CUDA kernel (CPU tiles are smaller)
BATCH_BYTES_PER_TOKEN = 8 + 8 + 4 + 8  # tokens, labels (int64), loss mask (fp32), positions


@dataclasses.dataclass(frozen=True)
class Block:
    """A step of the forward pass. `saved` lives from its forward to its backward; `fwd` and
    `bwd` are the extra working bytes while its forward / backward runs."""

    name: str
    saved: float
    fwd: float
    bwd: float


@dataclasses.dataclass(frozen=True)
class Options:
    """How the model is built, which decides what is kept."""

    attention: str  # local | flash | ring
    te_spec: bool  # TE layer spec (fused norms) instead of the local one
    fused_loss: bool  # fused linear cross-entropy instead of materialised logits
    fused_swiglu: bool  # our swiglu that recomputes its inside in backward
    sequence_parallel: bool  # hidden-sized tensors split over TP


@dataclasses.dataclass(frozen=True)
class Micro:
    """One micro-batch on one rank: b sequences of s tokens (s already divided by CP)."""

    b: int
    s: int

    @property
    def tokens(self) -> int:
        return self.b * self.s


class LayerTerms:
    """Blocks of one transformer layer, the embedding and the output/loss head."""

    def __init__(self, shape: ModelShape, micro: Micro, opts: Options, tp: int):
        self.shape, self.micro, self.opts, self.tp = shape, micro, opts, tp
        self.e = shape.dtype_bytes
        self.T = micro.tokens
        self.hs = shape.hidden // (tp if opts.sequence_parallel else 1)

    @property
    def layer_input(self) -> float:
        """A hidden-state tensor [s, b, h] (split over TP with sequence parallelism)."""
        return self.hs * self.e * self.T

    @property
    def grad_flow(self) -> float:
        """The hidden-state gradient that enters a block's backward."""
        return self.layer_input

    def norm(self, name: str) -> Block:
        hs, T, e = self.hs, self.T, self.e
        if self.opts.te_spec:
            return Block(name, 2 * hs * e * T + FP32 * T, 0, FP32 * hs * T + self.grad_flow)
        return Block(name, (FP32 + FP32 + e) * hs * T + FP32 * T, FP32 * hs * T,
                     2 * FP32 * hs * T + self.grad_flow)

    def qkv_rope(self) -> Block:
        sh, e, T = self.shape, self.e, self.T
        qkv = (sh.heads + 2 * sh.groups) * sh.head_dim * e * T
        rope = 4 * self.micro.s * sh.head_dim * e  # cos and sin, for q and for k
        return Block("qkv+rope", rope, qkv + sh.heads * sh.head_dim * e * T,
                     2 * qkv + self.grad_flow)

    def attention_inputs(self) -> float:
        """q and k after RoPE and v (a view that keeps the whole QKV output)."""
        sh, e, T = self.shape, self.e, self.T
        return (2 * sh.heads + 3 * sh.groups) * sh.head_dim * e * T

    def core_attention(self) -> Block:
        sh, e, T, b, s = self.shape, self.e, self.T, self.micro.b, self.micro.s
        q = sh.heads * sh.head_dim * T  # elements of q (and of the attention output)
        kv = sh.groups * sh.head_dim * T  # elements of k (or v) at num_query_groups heads
        lse = sh.heads * T * FP32
        if self.opts.attention == "local":
            scores = b * sh.heads * s * s
            if sh.heads > sh.groups:
                kept_kv = 2 * q * e  # the repeated K and V
            else:
                kept_kv = self.attention_inputs() - q * e  # K after RoPE + QKV through V
            probs = scores * FP32 + (scores * e if e != FP32 else 0)
            saved = q * e + kept_kv + probs + s * s
            fwd = scores * (e + (FP32 if e != FP32 else 0)) + 9 * s * s
            return Block("core attention (local)", saved, fwd,
                         3 * FP32 * scores + self.grad_flow)
        inputs = self.attention_inputs()
        grads = (q + 2 * kv) * e
        if self.opts.attention == "flash":
            return Block("core attention (flash)", inputs + lse, 0,
                         grads + q * FP32 + self.grad_flow)
        # ring: keeps its own output beside the copy linear_proj keeps; the KV block in
        # flight travels beside the one in use, and so do the fp32 dK/dV in backward
        return Block("core attention (ring)", inputs + q * e + lse,
                     4 * kv * e + q * FP32,
                     (q + 2 * kv) * FP32 + q * FP32 + 4 * kv * FP32 + 4 * kv * e
                     + self.grad_flow)

    def proj(self) -> Block:
        ctx = self.shape.heads * self.shape.head_dim * self.e * self.T
        return Block("attention out-proj", ctx, self.layer_input, ctx + self.grad_flow)

    def mlp(self) -> Block:
        f = self.shape.ffn * self.e * self.T
        kept = 3 if self.opts.fused_swiglu else 5
        # backward: fc2 frees its input as it makes its gradient; then the product's
        # backward holds the two ffn-sized gradients of its factors
        return Block("mlp (swiglu)", kept * f, f, 2 * f + self.grad_flow)

    def layer(self) -> List[Block]:
        return [self.norm("input norm"), self.qkv_rope(), self.core_attention(), self.proj(),
                self.norm("pre-mlp norm"), self.mlp()]

    def embedding(self) -> Block:
        """Token ids (and with TP the shifted ids and the out-of-shard mask); the weight's
        gradient is dense [v/t, h] in backward."""
        sh, T = self.shape, self.T
        saved = 8 * T + (9 * T if self.tp > 1 else 0)
        weight_grad = sh.vocab * sh.hidden * sh.dtype_bytes
        return Block("embedding", saved, sh.hidden * self.e * T, weight_grad + self.grad_flow)

    def head(self) -> Block:
        """Output layer and loss; the logits term is the fp32 [s*b, v/t] softmax."""
        sh, e, T = self.shape, self.e, self.T
        weight_grad = sh.vocab * sh.hidden * sh.dtype_bytes
        back = sh.hidden * e * T + weight_grad
        if self.opts.fused_loss:  # keeps lse, targets and row ids; one fp32 tile at a time
            tile = FUSED_CE_TILE * FP32
            return Block("output layer + fused loss", (FP32 + 8 + 8) * T, tile,
                         tile + sh.hidden * FP32 * T + sh.vocab * sh.hidden * FP32)
        logits = sh.vocab * T
        low = logits * e if e != FP32 else 0  # bf16 logits, then their bf16 gradient
        return Block("output layer + logits loss", logits * FP32 + 9 * T, low, back + low)

    def persistent(self) -> float:
        """Kept across steps once allocated: local attention's [b*np, s, s] score buffer
        (megatron's global memory buffer) and the RoPE table."""
        sh, b, s = self.shape, self.micro.b, self.micro.s
        buffer = b * sh.heads * s * s * self.e if self.opts.attention == "local" else 0
        return buffer + s * sh.head_dim * FP32

    def pipeline_io(self, first: bool, last: bool) -> float:
        """Per in-flight micro-batch: the stage output kept until its backward, and the
        received input where the first norm does not keep it itself (local spec in bf16)."""
        out = 0 if last else self.layer_input
        keeps_input = self.opts.te_spec or self.e == FP32
        return out + (0 if first or keeps_input else self.layer_input)


def korthikanti_layer_bytes(shape: ModelShape, micro: Micro, tp: int,
                            sequence_parallel: bool) -> float:
    """Korthikanti et al.'s bytes per layer, for comparison: s*b*h*(34 + 5*a*s/h)/t with
    sequence parallelism, s*b*h*(10 + 24/t + 5*a*s/(h*t)) without."""
    s, b, h, a = micro.s, micro.b, shape.hidden, shape.full_heads
    if sequence_parallel:
        return s * b * h * (34 + 5 * a * s / h) / tp
    return s * b * h * (10 + 24 / tp + 5 * a * s / (h * tp))
