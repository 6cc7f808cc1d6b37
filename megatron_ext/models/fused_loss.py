"""GPTModel whose training loss goes through our fused linear cross-entropy: the last stage
never builds the [tokens x vocab/tp] logits or their gradient (model.fused_loss=true)."""
from __future__ import annotations

from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from megatron_ext.ops import fused_linear_cross_entropy


class FusedLossGPTModel(GPTModel):
    """megatron's GPTModel with the loss of `forward(..., labels=...)` computed from the final
    hidden states and the output-layer weight shard, chunk by chunk. Logits are still produced
    when no labels are given (evaluation, generation), and megatron's own path serves the
    cases the fused op does not cover (multi-token prediction, sequence parallelism)."""

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        fused = (self.post_process and labels is not None and self.config.mtp_num_layers is None
                 and not self.config.sequence_parallel)
        if not fused:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else self.output_layer.weight)
        s, b, h = hidden_states.shape
        tp_group = ps.get_tensor_model_parallel_group() if self.config.tensor_model_parallel_size > 1 else None
        loss = fused_linear_cross_entropy(
            hidden_states.reshape(s * b, h), weight, labels.t().reshape(-1),
            reduction="none", tp_group=tp_group)
        return loss.view(s, b).t()  # [b, s], as megatron's compute_language_model_loss
