"""Memory planner: predicted bytes per rank for a training config (issue #5).

`plan(cfg, world_size)` gives static bytes (parameters, fp32 grad buffers, Adam state, master
copies) and the activation peak for the first, middle and last pipeline stage; the CLI
`python -m megatron_ext.memory <overrides> [--gpu-mem 80GiB]` prints them with a verdict.
"""
from megatron_ext.memory.planner import Plan, PlanError, plan

__all__ = ["Plan", "PlanError", "plan"]
