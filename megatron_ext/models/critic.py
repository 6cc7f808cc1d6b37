"""The PPO critic: a second megatron GPTModel in the policy's parallel layout whose output layer
is a scalar value head, with its own optimizer.

The head replaces GPTModel's vocab-parallel output layer on the last pipeline stage, so the
model returns `[b, s, 1]` values where the policy returns `[b, s, v/tp]` logits. It is one row
replicated over TP: every TP rank sees the same final hidden states (the row-parallel layers
all-reduce them) and so computes the same values and the same head gradient."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_ext.config.schema import Config
from megatron_ext.models.gpt import build_gpt_chunks, wrap_ddp
from parallel.topology import Topology

HEAD = "output_layer."  # the value head's parameter prefix (not in an SFT checkpoint)


class ValueHead(MegatronModule):
    """hidden `[s, b, h]` -> value `[s, b, 1]` in fp32, called as GPTModel calls its output
    layer. Zero-initialised: the first values are 0, so the first advantages are the returns."""

    def __init__(self, config):
        super().__init__(config)
        self.weight = torch.nn.Parameter(torch.zeros(1, config.hidden_size,
                                                     dtype=config.params_dtype))

    def forward(self, hidden, weight=None, runtime_gather_output=None):
        return F.linear(hidden.float(), self.weight.float()), None


def critic_config(cfg: Config) -> Config:
    """The critic's view of the config: untied head (it has no vocab projection), its own LR,
    held constant (the optimizer the RL recipe builds for it reads this)."""
    train = dataclasses.replace(cfg.train, lr=cfg.rl.critic_lr, min_lr=cfg.rl.critic_lr,
                                warmup_steps=0, lr_decay_style="constant")
    model = dataclasses.replace(cfg.model, tie_embeddings=False)
    return dataclasses.replace(cfg, train=train, model=model)


def build_critic(cfg: Config, topo: Topology, vocab_size: int, init: bool = True):
    """DDP-wrapped critic chunks: the policy's trunk, a value head on the last stage; init as
    build_gpt_chunks' (the head is zeros either way)."""
    ccfg = critic_config(cfg)
    chunks = build_gpt_chunks(ccfg, topo, vocab_size, init)
    for chunk in chunks:
        if chunk.post_process:
            chunk.output_layer = ValueHead(chunk.config).to(topo.device)
    return wrap_ddp(ccfg, chunks)
