"""megatron-core 0.16.1 optimizers over torch's Adam (no TransformerEngine or apex, as on CPU):
the gaps in checkpointing their state, closed around megatron's calls.

- An optimizer that has not stepped has no Adam state, so its checkpoint holds no optimizer
  tensors, and loading that checkpoint into a stepped optimizer fails (KeyError: no
  `optimizer.state.exp_avg...` in the checkpoint; seen restoring RL's step-0 best). And the
  DistributedOptimizer's `state_dict()`, which `sharded_state_dict(is_loading=True)` calls,
  asserts one common Adam step over a state that is empty before the first step, so a fresh
  distributed optimizer cannot take a checkpoint. `fill_fresh_adam_state` gives every
  parameter the state torch's Adam starts from (zeros at step 0): the next step is the same.
- DistributedOptimizer.load_state_dict puts torch Adam's `step` into every parameter's state
  and then copies the checkpoint's tensors over every state key
  (`_set_main_param_and_optimizer_states`), the step included, which the checkpoint keeps in
  the param groups instead: KeyError 'step'.
- and it hands ONE step tensor to every parameter's state, which torch's Adam increments in
  place per parameter: after a resume the step would grow by the number of parameters per
  update (wrong bias correction; measured: the second step after a resume differed, 5.4343 vs
  5.4365).
- megatron's other optimizers save the common Adam step only `if step:`: a step-0 checkpoint
  holds none, and torch's Adam refuses state without one.
`load_optimizer_state` runs megatron's load with these mended."""
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
    """Zero Adam state (megatron's own init_state_fn), at step 0 for torch's Adam, for every
    parameter without state (not stepped yet)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner, init = getattr(opt, "optimizer", None), getattr(opt, "init_state_fn", None)
        if inner is None or init is None:
            continue
        init(inner, opt.config)
        if isinstance(inner, torch.optim.Adam):  # AdamW too; its step lives in the state
            for group in inner.param_groups:
                # where torch's Adam keeps it: on the param's device when fused or capturable
                on_param = group.get("fused") or group.get("capturable")
                for p in group["params"]:
                    inner.state[p].setdefault("step", torch.zeros(
                        (), dtype=torch.float32, device=p.device if on_param else "cpu"))


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


def _zero_steps_restored(optimizer, loaded: Dict) -> None:
    """megatron's (non-distributed) optimizers save the common Adam step only `if step:`, so a
    checkpoint of step 0 (filled state) holds none, and torch's Adam refuses state without a
    step: put the 0 back."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded] if len(subs) == 1 else [v for _, v in sorted(loaded.items())]
    for sub, part in zip(subs, parts):
        if isinstance(sub, DistributedOptimizer) or not isinstance(
                getattr(sub, "optimizer", None), torch.optim.Adam):
            continue
        state = (part["optimizer"] if "state" not in part else part)["state"]
        if state and "common_step" not in state:
            state["common_step"] = torch.tensor(0.0)


def load_optimizer_state(optimizer, loaded: Dict) -> None:
    """megatron's optimizer.load_state_dict(loaded), with the gaps above closed."""
    _zero_steps_restored(optimizer, loaded)
    opts = _torch_adam_dist_optimizers(optimizer)
    with contextlib.ExitStack() as stack:
        for opt in opts:
            stack.enter_context(_step_kept_out_of_copies(opt))
        optimizer.load_state_dict(loaded)
    for opt in opts:  # one step tensor per parameter state
        for state in opt.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].clone()
