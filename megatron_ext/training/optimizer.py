"""megatron-core's optimizer (AdamW, optionally the distributed optimizer) and LR schedule."""
from __future__ import annotations

from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.config.schema import Config


# train.* fields that megatron's OptimizerConfig takes under the same name
_SHARED_FIELDS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                  "clip_grad")


def build_optimizer(cfg: Config, model_chunks):
    opt_config = OptimizerConfig(
        optimizer="adam",
        **{name: getattr(cfg.train, name) for name in _SHARED_FIELDS},
        bf16=cfg.model.dtype == "bf16",
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, model_chunks)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warm-up to train.lr, then decay to train.min_lr at train.steps (in steps)."""
    t = cfg.train
    warmup = min(t.warmup_steps, max(t.steps - 1, 0))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(t.steps, warmup + 1),
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=max(t.steps, 1),
        wd_incr_style="constant",
    )
