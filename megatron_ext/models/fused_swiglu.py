"""Route megatron-core's gated MLP through our swiglu when `model.fused_swiglu` resolves to on.

megatron's MLP (0.16.1, transformer/mlp.py) has one path that hands the whole fc1 output
[..., 2*ffn/tp] (bias already added) to a module: `config.use_te_activation_func=True` with
`MLPSubmodules.activation_func` set. Despite the name, nothing there needs TransformerEngine;
megatron only checks that `activation_func` is gelu/silu/relu. The fc1 width is still doubled
by `gated_linear_unit=True`, and each TP rank's fc1 output is its own [gate, value] pair, so
chunking it locally is right.

Call from the model builder, after the config and layer spec are made and before GPTModel:

    if resolve_fused("fused_swiglu", cfg.model.fused_swiglu, device_type).use:
        config, layer_spec = apply_fused_swiglu(config, layer_spec)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec, ...)

Both flags must change together: the config flag alone would make megatron apply plain silu
to the whole fc1 output, which is silently wrong; this function sets both or raises.
"""

import copy
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.ops.swiglu import swiglu


class SwiGLUActivation(torch.nn.Module):
    """The module megatron builds as `activation_func(config=...)`; applies swiglu to fc1 out."""

    def __init__(self, config=None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """No parameters, nothing to save; megatron's MLP asks every child for its part."""
        return {}


def _check_config(config) -> None:
    rules = [
        (config.gated_linear_unit, "gated_linear_unit must be True (swiglu is a gated unit)"),
        (config.activation_func is F.silu, "activation_func must be F.silu"),
        (config.glu_linear_offset == 0.0, "glu_linear_offset must be 0"),
        (config.activation_func_clamp_value is None, "activation_func_clamp_value must be None"),
        (not config.num_moe_experts, "num_moe_experts must be unset (dense MLP only)"),
        (not config.activation_func_fp8_input_store,
         "activation_func_fp8_input_store must be False"),
    ]
    broken = [rule for ok, rule in rules if not ok]
    if broken:
        raise ValueError(f"model.fused_swiglu=true cannot apply: {'; '.join(broken)}. Fix those "
                         "config fields or set model.fused_swiglu=false")


def _replace_activations(spec) -> int:
    """Set activation_func on every MLPSubmodules under spec; returns how many were set."""
    if isinstance(spec, MLPSubmodules):
        spec.activation_func = ModuleSpec(module=SwiGLUActivation)
        return 1
    if isinstance(spec, ModuleSpec):
        return _replace_activations(spec.submodules)
    if isinstance(spec, (list, tuple)):
        return sum(_replace_activations(item) for item in spec)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return sum(_replace_activations(getattr(spec, f.name)) for f in dataclasses.fields(spec))
    return 0


def apply_fused_swiglu(config, layer_spec):
    """(config, layer_spec) copies whose dense MLPs use swiglu; the inputs are left unchanged.

    layer_spec is a layer ModuleSpec or a TransformerBlockSubmodules (per-layer specs).
    """
    _check_config(config)
    spec = copy.deepcopy(layer_spec)
    if _replace_activations(spec) == 0:
        raise ValueError(f"no MLP found in the layer spec {type(layer_spec).__name__}; pass the "
                         "spec GPTModel receives (e.g. get_gpt_layer_local_spec())")
    config = dataclasses.replace(config, use_te_activation_func=True,
                                 bias_activation_fusion=False)
    return config, spec
