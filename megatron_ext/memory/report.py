"""The plan as a table per rank type with a verdict, or as JSON for tests and scripts."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from megatron_ext.memory.planner import Plan, RankPlan

GIB = 2**30
KIND_LABEL = {"only": "the only pipeline stage (pp=1)", "first": "first pipeline stage",
              "middle": "middle pipeline stage", "last": "last pipeline stage"}


def verdict(rank: RankPlan, capacity: int, reserve: int) -> str:
    """fits: leaves the reserve (CUDA context, NCCL buffers, allocator fragmentation) free;
    tight: fits the device but eats into the reserve; does not fit: exceeds the device."""
    total = rank.total
    if total <= capacity - reserve:
        word = "FITS"
    elif total <= capacity:
        word = "TIGHT"
    else:
        word = "DOES NOT FIT"
    return (f"verdict: {KIND_LABEL[rank.kind]}: {total / GIB:.2f} GiB of {capacity / GIB:.2f} "
            f"GiB (reserve {reserve / GIB:.2f} GiB): {word}")


def _assumptions(plan: Plan) -> str:
    o = plan.options
    loss = "fused linear cross-entropy" if o.fused_loss else "materialised fp32 logits"
    swiglu = "fused swiglu (3*ffn kept)" if o.fused_swiglu else "megatron glu (5*ffn kept)"
    return (f"attention={o.attention}, layer spec={'TE' if o.te_spec else 'local'}, "
            f"loss={loss}, swiglu={swiglu}, sequence parallel={o.sequence_parallel}")


def render(plan: Plan, capacity: Optional[int], reserve: int) -> str:
    s = plan.summary
    unit, scale = ("GiB", GIB) if max(r.total for r in plan.ranks) >= GIB else ("MiB", 2**20)
    formula = "s*b*h*(34+5as/h)/t" if plan.options.sequence_parallel else \
        "s*b*h*(10+24/t+5as/(ht))"
    lines = [
        f"memory plan: model={s['model']} ({s['dtype']}) seq_len={s['seq_len']} "
        f"micro_batch={s['micro_batch_size']} x {s['microbatches']} micro-batches | "
        f"tp={s['tp']} pp={s['pp']}{'' if not s['vpp'] else ' vpp=%s' % s['vpp']} cp={s['cp']} "
        f"dp={s['dp']} (world {s['world_size']}) | recompute={s['recompute']}"
        + (f" ({s['recompute_method']}, {s['recompute_num_layers']})"
           if s["recompute"] == "full" else "")
        + f" | distributed optimizer={'on' if s['distributed_optimizer'] else 'off'}",
        f"assumptions: {_assumptions(plan)}",
        *(f"note: {note}" for note in plan.notes),
        f"per layer per micro-batch: {plan.ours_layer / scale:.3f} {unit} saved (recompute "
        f"none); Korthikanti et al. {formula} = {plan.korthikanti_layer / scale:.3f} {unit}",
    ]
    width = max(len(t.name) for r in plan.ranks for t in r.terms) + 2
    for rank in plan.ranks:
        lines += ["", f"{KIND_LABEL[rank.kind]} (pp rank {rank.pp_rank}), "
                      f"{rank.in_flight} micro-batch(es) in flight, peak at {rank.peak_at}",
                  f"  {'term':<{width}}{unit:>10}"]
        rows = [(t.name, t.bytes) for t in rank.terms] + [
            ("static (params, grads, optimizer)", rank.static),
            ("activations (peak)", rank.activations), ("total", rank.total)]
        lines += [f"  {name:<{width}}{value / scale:>10.3f}" for name, value in rows]
    lines.append("")
    if capacity is None:
        lines.append("no device memory given (--gpu-mem) and no GPU visible: totals only")
    else:
        lines += [verdict(r, capacity, reserve) for r in plan.ranks]
    return "\n".join(lines)


def to_json(plan: Plan, capacity: Optional[int], reserve: int) -> Dict:
    ranks: List[Dict] = []
    for r in plan.ranks:
        entry = {"kind": r.kind, "pp_rank": r.pp_rank, "in_flight": r.in_flight,
                 "peak_at": r.peak_at, "terms": {t.name: t.bytes for t in r.terms},
                 "static": r.static, "activations": r.activations, "total": r.total}
        if capacity is not None:
            entry["verdict"] = verdict(r, capacity, reserve).rsplit(": ", 1)[1]
        ranks.append(entry)
    return {"summary": plan.summary, "options": dataclasses.asdict(plan.options),
            "korthikanti_layer_bytes": plan.korthikanti_layer,
            "layer_bytes": plan.ours_layer, "notes": plan.notes, "capacity_bytes": capacity,
            "reserve_bytes": reserve if capacity is not None else None, "ranks": ranks}
