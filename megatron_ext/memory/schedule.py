"""How recompute and the pipeline schedule turn per-block terms into a peak.

One micro-batch: forward adds each block's saved bytes in turn; backward walks the blocks in
reverse and frees them. The peak is the largest of (what is saved so far + the running
block's working bytes) over both walks.

Recompute (megatron's tensor_parallel.checkpoint) replaces a run of blocks by one block that
keeps only its inputs, runs them without saving in forward, and in backward runs them again
with saving and then backward, so its backward working bytes are that run's whole
one-micro-batch peak.

Pipeline: in 1F1B stage i of pp holds min(M, pp - i) micro-batches at once; the peak is
when the newest runs its forward or the oldest its backward while the others sit saved.
Interleaved 1F1B (vpp chunks) holds min(M*vpp, 2*(pp-i-1) + (vpp-1)*pp + 1) chunk-micro-batches,
each with one chunk's layers: the first stage holds pp*(1 + (pp-1)/(pp*vpp)) micro-batches'
worth of its layers, as Korthikanti et al. note.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from megatron_ext.memory.activations import Block


def profile(blocks: Sequence[Block]) -> Tuple[float, float, str]:
    """(saved bytes, peak bytes, where the peak is) of one micro-batch through `blocks`."""
    saved = peak = 0.0
    where = ""
    for block in blocks:
        if saved + block.saved + block.fwd > peak:
            peak, where = saved + block.saved + block.fwd, f"forward of {block.name}"
        saved += block.saved
    live = saved
    for block in reversed(blocks):
        if live + block.bwd > peak:
            peak, where = live + block.bwd, f"backward of {block.name}"
        live -= block.saved
    return saved, peak, where


def checkpointed(name: str, blocks: Sequence[Block], inputs: float) -> Block:
    """A recomputed run of blocks that keeps `inputs` bytes."""
    _, peak, _ = profile(blocks)
    no_grad_forward = max(b.saved + b.fwd for b in blocks)
    return Block(name, inputs, no_grad_forward, peak)


def recompute(layers: List[List[Block]], first_layer: int, policy: str, method: str,
              num_layers: int, layer_input: float, attention_inputs: float) -> List[Block]:
    """The blocks of a chunk's layers under train.recompute (none | selective | full)."""
    if policy == "none":
        return [b for layer in layers for b in layer]
    if policy == "selective":  # megatron's default recompute_modules: ["core_attn"]
        return [checkpointed(f"{b.name}, recomputed", [b], attention_inputs)
                if b.name.startswith("core attention") else b
                for layer in layers for b in layer]
    step = num_layers if method == "uniform" else 1  # block: the first num_layers, one by one
    out: List[Block] = []
    for i in range(0, len(layers), step):
        group = layers[i:i + step]
        if method == "block" and i >= num_layers:  # the rest of the chunk keeps everything
            out += group[0]
            continue
        last = first_layer + i + len(group) - 1
        label = f"layer {first_layer + i}" + (f"-{last}" if last != first_layer + i else "")
        out.append(checkpointed(f"{label}, recomputed", [b for g in group for b in g],
                                layer_input))
    return out


def in_flight(pp: int, pp_rank: int, microbatches: int, vpp: Optional[int]) -> int:
    """Micro-batches (interleaved: chunk-micro-batches) whose activations a rank holds at once."""
    if pp == 1:
        return 1
    if not vpp or vpp == 1:
        return min(microbatches, pp - pp_rank)
    units = microbatches * vpp
    warmup = 2 * (pp - pp_rank - 1) + (vpp - 1) * pp
    return units if warmup >= units else warmup + 1
