"""Predicted bytes per rank for a training config: static state plus the activation peak, for
the first, middle and last pipeline stage."""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

from megatron_ext.config.fields import check_fields
from megatron_ext.config.layout import ParallelDims
from megatron_ext.config.schema import Config
from megatron_ext.data.tokenizer import build_tokenizer
from megatron_ext.memory.activations import (BATCH_BYTES_PER_TOKEN, LayerTerms, Micro, Options,
                                             korthikanti_layer_bytes)
from megatron_ext.memory.model_terms import ModelShape, stage_chunks
from megatron_ext.memory.schedule import in_flight, profile, recompute
from megatron_ext.memory.static import StaticBytes, static_bytes


class PlanError(ValueError):
    """A config the planner cannot model; the message names the value, the rule and the fix."""


@dataclasses.dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    static: bool


@dataclasses.dataclass(frozen=True)
class RankPlan:
    kind: str  # first | middle | last | only (pp = 1)
    pp_rank: int
    in_flight: int
    peak_at: str
    terms: List[Term]
    static_detail: StaticBytes  # the static terms, itemised as megatron allocates them

    @property
    def static(self) -> float:
        return sum(t.bytes for t in self.terms if t.static)

    @property
    def activations(self) -> float:
        return sum(t.bytes for t in self.terms if not t.static)

    @property
    def total(self) -> float:
        return self.static + self.activations


@dataclasses.dataclass(frozen=True)
class Plan:
    summary: Dict[str, object]
    options: Options
    ranks: List[RankPlan]
    korthikanti_layer: float  # reference bytes per layer per micro-batch
    ours_layer: float  # our saved bytes per layer per micro-batch (recompute none)
    notes: List[str]  # what would stop this config from training, though its bytes are planned


def _options(cfg: Config, attention: str, spec: str, fused_loss: Optional[bool],
             fused_swiglu: Optional[bool]) -> Options:
    """The build the plan assumes; "auto" and None follow what the builder would do here."""
    if spec == "auto":
        from megatron_ext.compat import has_transformer_engine
        spec = "te" if has_transformer_engine() else "local"
    if attention == "auto":
        attention = "ring" if cfg.parallel.cp > 1 else ("flash" if spec == "te" else "local")
    if cfg.parallel.cp > 1 and attention != "ring":
        raise PlanError(f"attention={attention} with parallel.cp={cfg.parallel.cp}: context "
                        "parallelism runs ring attention; pass --attention auto (or ring)")

    def wired(key: str, override: Optional[bool]) -> bool:
        if override is not None:
            return override
        import torch

        from megatron_ext.ops import resolve_fused
        device = "cuda" if torch.cuda.is_available() else "cpu"  # as the builder would here
        return resolve_fused(key, getattr(cfg.model, key), device).use

    return Options(
        attention=attention, te_spec=spec == "te",
        fused_loss=wired("fused_loss", fused_loss),
        fused_swiglu=wired("fused_swiglu", fused_swiglu),
        sequence_parallel=cfg.parallel.sequence_parallel and cfg.parallel.tp > 1)


def _check(cfg: Config, world_size: int) -> ParallelDims:
    """The layout rules of validate() that concern memory. Context parallelism is accepted:
    validate() still refuses cp > 1 until ring attention is wired into the model."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    dims = ParallelDims(world_size=world_size, tp=p.tp, pp=p.pp, cp=p.cp, vpp=p.vpp)
    dims.validate(num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                  num_query_groups=m.num_query_groups, seq_len=t.seq_len,
                  global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
                  sequence_parallel=False)  # planning a GPU run from here: TE norms allowed
    check_fields(cfg)  # choices and bounds on the fields
    per_chunk = m.num_layers // (p.pp * (p.vpp or 1))
    if t.recompute == "full":
        k = t.recompute_num_layers
        if not 1 <= k <= per_chunk:
            raise PlanError(f"train.recompute_num_layers={k} must be within 1..{per_chunk} "
                            f"(the layers of one model chunk); set it in that range")
        if t.recompute_method == "uniform" and per_chunk % k:
            raise PlanError(f"train.recompute_num_layers={k} does not divide the {per_chunk} "
                            "layers of a model chunk; megatron's uniform recompute would index "
                            "past the last layer. Pick a divisor or recompute_method=block")
    return dims


def _notes(cfg: Config) -> List[str]:
    """Rules of validate() and megatron that training would stop on; planning goes on."""
    m, notes = cfg.model, []
    if m.num_attention_heads % m.num_query_groups:
        notes.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                     f"model.num_query_groups={m.num_query_groups}: megatron's grouped-query "
                     "attention (and validate()) refuse this shape; the bytes are planned as "
                     "if it ran. Make the heads a multiple of the KV groups to train it")
    return notes


def _activation_terms(cfg: Config, shape: ModelShape, dims: ParallelDims, opts: Options,
                      pp_rank: int, microbatches: int):
    """(micro-batches in flight, where the peak is, activation terms) of one pipeline rank.
    With interleaving its chunks take turns, so the n chunk-micro-batches in flight hold on
    average n/vpp of each chunk's saved bytes."""
    t = cfg.train
    vpp = cfg.parallel.vpp if cfg.parallel.vpp and cfg.parallel.vpp > 1 else None
    terms = LayerTerms(shape, Micro(t.micro_batch_size, t.seq_len // dims.cp), opts, dims.tp)
    layers_saved = edge_saved = io = 0.0
    profiles = []
    chunks = stage_chunks(shape, dims.pp, vpp or 1, pp_rank)
    for layers, first, last in chunks:
        body = recompute([terms.layer() for _ in layers], layers.start, t.recompute,
                         t.recompute_method, t.recompute_num_layers, terms.layer_input,
                         terms.attention_inputs())
        embed = [terms.embedding()] if first else []
        head = [terms.norm("final norm"), terms.head()] if last else []
        body_saved = profile(body)[0]
        profiles.append(profile(embed + body + head))
        layers_saved += body_saved
        edge_saved += profiles[-1][0] - body_saved
        io += terms.pipeline_io(first, last)
    n = in_flight(dims.pp, pp_rank, microbatches, vpp)
    share = n / len(chunks)
    saved, peak, where = max(profiles, key=lambda p: p[1] - p[0])
    return n, where, [
        Term(f"activations: transformer layers x {n} in flight", share * layers_saved, False),
        Term("activations: embedding ids / final norm + logits", share * edge_saved, False),
        Term("pipeline tensors kept for backward", share * io, False),
        Term(f"working peak above saved ({where})", peak - saved, False),
        Term("persistent: attention score buffer + RoPE table", terms.persistent(), False),
        Term(f"micro-batch inputs (all {microbatches} of the step)",
             microbatches * t.micro_batch_size * t.seq_len * BATCH_BYTES_PER_TOKEN, False),
    ]


def _static_terms(static: StaticBytes, distributed: bool) -> List[Term]:
    shard = " (sharded over DP x CP)" if distributed else ""
    return [Term("parameters", static.params, True),
            Term("gradients (fp32 grad buffers)", static.grads, True),
            Term(f"optimizer: Adam m, v (fp32) + steps{shard}",
                 static.adam_moments + static.adam_steps, True),
            Term(f"optimizer: fp32 master params{shard}", static.master_params, True)]


def plan(cfg: Config, world_size: Optional[int] = None, *, attention: str = "auto",
         spec: str = "auto", fused_loss: Optional[bool] = None,
         fused_swiglu: Optional[bool] = None, dp_rank: Optional[int] = None) -> Plan:
    """The plan of every pipeline-rank type: first, middle (pipeline rank 1, the middle stage
    with the most micro-batches in flight) and last, or the only one at pp = 1. world_size
    defaults to tp*pp*cp (DP 1); the static terms are those of dp_rank, or of the DP rank
    holding the most by default."""
    p, t = cfg.parallel, cfg.train
    world_size = world_size or p.tp * p.pp * p.cp
    dims = _check(cfg, world_size)
    opts = _options(cfg, attention, spec, fused_loss, fused_swiglu)
    vocab = cfg.model.vocab_size or build_tokenizer(cfg.data.tokenizer).vocab_size
    shape = ModelShape.of(cfg, vocab)
    microbatches = t.global_batch_size // (t.micro_batch_size * dims.dp)
    shard_group = dims.dp * dims.cp
    kinds = {1: ["only"], 2: ["first", "last"]}.get(dims.pp, ["first", "middle", "last"])
    ranks = []
    for kind in kinds:
        pp_rank = {"only": 0, "first": 0, "middle": 1, "last": dims.pp - 1}[kind]
        candidates = [dp_rank] if dp_rank is not None else range(
            shard_group if p.use_distributed_optimizer else 1)
        static = max((static_bytes(cfg, shape, pp_rank, shard_group, r, opts.te_spec)
                      for r in candidates), key=lambda s: sum(s.as_dict().values()))
        n, where, act = _activation_terms(cfg, shape, dims, opts, pp_rank, microbatches)
        ranks.append(RankPlan(kind, pp_rank, n, where,
                              _static_terms(static, p.use_distributed_optimizer) + act, static))
    micro = Micro(t.micro_batch_size, t.seq_len // dims.cp)
    plain = LayerTerms(shape, micro, opts, dims.tp)
    summary = {
        "model": cfg.model.name, "dtype": cfg.model.dtype, "seq_len": t.seq_len,
        "micro_batch_size": t.micro_batch_size, "global_batch_size": t.global_batch_size,
        "microbatches": microbatches, "tp": dims.tp, "pp": dims.pp, "vpp": p.vpp,
        "cp": dims.cp, "dp": dims.dp, "world_size": world_size, "recompute": t.recompute,
        "recompute_method": t.recompute_method,
        "recompute_num_layers": t.recompute_num_layers,
        "distributed_optimizer": p.use_distributed_optimizer,
        "padded_vocab": shape.vocab * dims.tp,
    }
    return Plan(summary, opts, ranks,
                korthikanti_layer_bytes(shape, micro, dims.tp, opts.sequence_parallel),
                profile(plain.layer())[0], _notes(cfg))
