"""The parallel layout of a run (TP, PP, VPP, CP and the derived DP) and its arithmetic rules,
without torch: the launcher checks a layout before any process exists, and
`parallel.topology.initialize` builds the process groups from a checked one."""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_ext.config.fields import ConfigError


class LayoutError(ConfigError):
    """A parallel layout that cannot work; the message names the fields and the fix."""


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The parallel sizes of a run. DP is derived: world_size / (tp * pp * cp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: Optional[int] = None

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    def validate(self, *, num_layers: int, num_attention_heads: int, num_query_groups: int,
                 seq_len: int, global_batch_size: int, micro_batch_size: int,
                 sequence_parallel: bool = False, have_fused_norms: Optional[bool] = False
                 ) -> None:
        """Raise LayoutError for the first rule the layout breaks, before any group exists.
        have_fused_norms=None: not known in this process (a launcher on a login node); the
        sequence-parallel rule is then left to the processes that run."""
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name}={getattr(self, name)} must be >= 1; set it "
                                  "to 1 or more")
        model_parallel = self.tp * self.pp * self.cp
        if self.world_size % model_parallel:
            raise LayoutError(
                f"world size {self.world_size} is not divisible by parallel.tp*parallel.pp*"
                f"parallel.cp = {self.tp}*{self.pp}*{self.cp} = {model_parallel}; start a "
                f"multiple of {model_parallel} processes or change the sizes")
        if num_attention_heads % self.tp:
            raise LayoutError(
                f"model.num_attention_heads={num_attention_heads} is not divisible by "
                f"parallel.tp={self.tp}; pick a tp that divides it")
        if num_query_groups % self.tp:
            raise LayoutError(
                f"model.num_query_groups={num_query_groups} is not divisible by "
                f"parallel.tp={self.tp}; pick a tp that divides it")
        if self.vpp is not None:
            if self.vpp < 1:
                raise LayoutError(f"parallel.vpp={self.vpp} must be >= 1 or null")
            if self.pp < 2:
                raise LayoutError(
                    f"parallel.vpp={self.vpp} needs parallel.pp >= 2 (got {self.pp}); "
                    "set parallel.vpp=null or raise pp")
        chunks = self.pp * (self.vpp or 1)
        if num_layers % chunks:
            raise LayoutError(
                f"model.num_layers={num_layers} is not divisible by parallel.pp*vpp = "
                f"{self.pp}*{self.vpp or 1} = {chunks}; change the layer count or the sizes")
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise LayoutError(
                f"train.seq_len={seq_len} is not divisible by 2*parallel.cp = {2 * self.cp} "
                "(zigzag context parallelism cuts the sequence into 2*cp chunks); pad or "
                "change seq_len")
        if micro_batch_size < 1:
            raise LayoutError(f"train.micro_batch_size={micro_batch_size} must be >= 1; set it "
                              "to 1 or more")
        if global_batch_size % (micro_batch_size * self.dp):
            raise LayoutError(
                f"train.global_batch_size={global_batch_size} is not divisible by "
                f"train.micro_batch_size*dp = {micro_batch_size}*{self.dp} = "
                f"{micro_batch_size * self.dp}; change the batch sizes")
        if sequence_parallel and self.tp > 1 and have_fused_norms is False:
            raise LayoutError(
                "parallel.sequence_parallel=true needs TransformerEngine or NVIDIA apex "
                "LayerNorm kernels, which this machine does not have; set "
                "parallel.sequence_parallel=false")
