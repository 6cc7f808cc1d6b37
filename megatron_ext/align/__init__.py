"""Reasoning-trace format fidelity: profile traces, score them against a target style, gate SFT on it.

`megatron_ext.align.report` (write_report) and `megatron_ext.align.gate` (run_fidelity_gate) are
imported from their modules: they load matplotlib, which the other tools do not need.
"""
from megatron_ext.align.compare import Comparison, LoglikFn, compare
from megatron_ext.align.filter import FilterStats, write_split
from megatron_ext.align.jsonl import Trace, TraceFormatError, read_traces
from megatron_ext.align.profile import ProfileConfig, Summary, TraceProfile, profile_file, profile_trace
from megatron_ext.align.score import Reference, TraceScore
from megatron_ext.align.synth import make_traces, write_traces

__all__ = [
    "Comparison", "LoglikFn", "compare", "FilterStats", "write_split", "Trace", "TraceFormatError", "read_traces",
    "ProfileConfig", "Summary", "TraceProfile", "profile_file", "profile_trace", "Reference", "TraceScore",
    "make_traces", "write_traces",
]
