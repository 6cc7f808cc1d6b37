"""megatron-core 0.16.1 DistributedOptimizer over torch's Adam (no TransformerEngine or apex, as
on CPU): three gaps in loading its checkpoint, closed around megatron's calls.

- `state_dict()`, which `sharded_state_dict(is_loading=True)` calls, asserts that every Adam
  state holds one common step; before the first step there is no state at all, so a fresh
  optimizer cannot take a checkpoint: `fill_fresh_adam_state` gives every parameter zero state
  at step 0 (the load overwrites it).
- `load_state_dict` puts torch Adam's `step` into every parameter's state and then copies the
  checkpoint's tensors over every state key (`_set_main_param_and_optimizer_states`), the step
  included, which the checkpoint keeps in the param groups instead: KeyError 'step'.
- and it hands ONE step tensor to every parameter's state, which torch's Adam increments in
  place per parameter: after a resume the step would grow by the number of parameters per
  update (wrong bias correction).
`load_dist_optimizer` runs megatron's load with the step kept out of that copy, then gives each
state its own step."""
from __future__ import annotations

import contextlib
from typing import Dict, List

import torch


def _torch_adam_dist_optimizers(optimizer) -> List:
    from megatron.core.optimizer import distrib_optimizer as dopt
    if dopt.HAVE_APEX_OR_TE:  # their fused Adam keeps the step in the param groups
        return []
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, dopt.DistributedOptimizer)]


def fill_fresh_adam_state(optimizer) -> None:
    """Zero Adam state at step 0 for a distributed optimizer that has not stepped yet."""
    for opt in _torch_adam_dist_optimizers(optimizer):
        inner = opt.optimizer
        if inner.state:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def _step_kept_out_of_copies(opt):
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        group_index, group_order = opt.model_param_group_index_map[model_param]
        state = opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    opt._set_main_param_and_optimizer_states = set_states  # this instance, for this load
    try:
        yield
    finally:
        del opt._set_main_param_and_optimizer_states


def load_dist_optimizer(optimizer, loaded: Dict) -> None:
    """megatron's optimizer.load_state_dict(loaded), with the gaps above closed."""
    opts = _torch_adam_dist_optimizers(optimizer)
    with contextlib.ExitStack() as stack:
        for opt in opts:
            stack.enter_context(_step_kept_out_of_copies(opt))
        optimizer.load_state_dict(loaded)
    for opt in opts:  # one step tensor per parameter state
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
