"""megatron's GPTModel with the training loss over the real vocab only, and (model.fused_loss=
true) through our fused linear cross-entropy: the last stage never builds the
[tokens x vocab/tp] logits or their gradient.

megatron pads the output layer to a multiple of make_vocab_size_divisible_by * tp rows; its
own loss takes the log-sum-exp over every row, padding included, so the loss (ln 384 at TP1,
ln 512 at TP2 at init for the 259-token byte vocab) would depend on the layout."""
from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from megatron_ext.ops import fused_linear_cross_entropy


class VocabGPTModel(GPTModel):
    """GPTModel that knows its real vocab (`real_vocab_size`; `vocab_size` stays megatron's
    padded count) and keeps the padded logits out of megatron's vocab-parallel loss. Logits
    returned without labels keep their padded columns: evaluation and generation cut them."""

    def __init__(self, *args, real_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < real_vocab_size <= self.vocab_size:
            raise ValueError(f"real_vocab_size={real_vocab_size} must be in [1, "
                             f"{self.vocab_size}], the padded vocab")
        self.real_vocab_size = real_vocab_size
        self._document_positions = None

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        """With an attention mask (packed documents: models.attention.document_mask), RoPE
        takes each token's position from `position_ids` (restarting at 0 in every document)
        instead of its index in the row."""
        self._document_positions = position_ids if attention_mask is not None else None
        try:
            return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)
        finally:
            self._document_positions = None

    def _preprocess(self, *args, **kwargs):
        out = super()._preprocess(*args, **kwargs)
        positions = self._document_positions
        if positions is None or out[1] is None:
            return out
        table = self.rotary_pos_emb.get_emb(int(positions.max()) + 1)  # [n, 1, 1, d]
        return (out[0], table[positions.t(), 0], *out[2:])  # [s, b, 1, d] against [s, b, h, d]

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """Training logits without labels (the RL objectives) as the `[b, s, v/tp]` view of the
        output layer's `[s, b, v/tp]`: megatron's `.contiguous()` there copies the whole logits
        in forward and again their gradient in backward (2 x 2.3 ms of a 160 ms GRPO update on
        the tiny model); the losses read the view. Every other case is megatron's."""
        plain = (labels is None and self.post_process and self.training
                 and torch.is_grad_enabled() and self.config.mtp_num_layers is None
                 and kwargs.get("inference_context") is None
                 and not kwargs.get("mtp_in_postprocess"))
        if not plain:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels,
                                        *args, **kwargs)
        weight = (self.shared_embedding_or_output_weight()
                  if self.share_embeddings_and_output_weights else None)
        logits, _ = self.output_layer(hidden_states, weight=weight,
                                      runtime_gather_output=kwargs.get("runtime_gather_output"))
        return logits.transpose(0, 1)

    def compute_language_model_loss(self, labels, logits):
        """megatron's loss with this shard's padding columns at -inf: they add exp(-inf) = 0
        to the sum and get zero gradient. logits `[s, b, v/tp]`."""
        v_local = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * v_local
        if start + v_local > self.real_vocab_size:
            ids = torch.arange(start, start + v_local, device=logits.device)
            logits = logits.masked_fill(ids >= self.real_vocab_size, float("-inf"))
        return super().compute_language_model_loss(labels, logits)


class FusedLossGPTModel(VocabGPTModel):
    """The loss of `forward(..., labels=...)` computed from the final hidden states and the
    output-layer weight shard, chunk by chunk. Logits are still produced when no labels are
    given (evaluation, generation), and megatron's own path (with the padding masked) serves
    the cases the fused op does not cover (multi-token prediction, sequence parallelism)."""

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
            reduction="none", tp_group=tp_group, vocab_size=self.real_vocab_size)
        return loss.view(s, b).t()  # [b, s], as megatron's compute_language_model_loss
