"""Prediction against measurement: one row per pipeline-rank type of a measured layout.

Records come from measure.measure_layouts (one per process). Activations compare the
planner's activation peak with the largest measured one among the ranks of that pipeline
stage; static bytes must match each rank's count exactly (its own DP rank's shard).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from megatron_ext.config.load import compose_config
from megatron_ext.memory.planner import plan




def compare(overrides: Sequence[str], world_size: int, records: List[Dict]) -> List[Dict]:
    """Rows {kind, pp_rank, predicted, measured, ratio, static_exact, static_mismatch}."""
    cfg = compose_config(list(overrides))
    rows = []
    for rank in plan(cfg, world_size).ranks:
        mine = [r for r in records if r["pp_rank"] == rank.pp_rank]
        mismatch = []
        for record in mine:
            predicted = next(r for r in plan(cfg, world_size, dp_rank=record["dp_rank"]).ranks
                             if r.pp_rank == rank.pp_rank).static_detail.as_dict()
            measured = record["static"]
            mismatch += [f"rank(pp={record['pp_rank']}, tp={record['tp_rank']}, "
                         f"dp={record['dp_rank']}) {k}: predicted {predicted[k]}, measured "
                         f"{measured[k]}" for k in predicted if predicted[k] != measured[k]]
        measured = max(r["activation_peak"] for r in mine)
        rows.append({"kind": rank.kind, "pp_rank": rank.pp_rank, "in_flight": rank.in_flight,
                     "predicted": rank.activations, "measured": measured,
                     "ratio": rank.activations / measured, "peak_at": rank.peak_at,
                     "static_exact": not mismatch, "static_mismatch": mismatch})
    return rows
