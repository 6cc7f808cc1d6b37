"""The optional megatron backend of the generation engine (`generate.engine=megatron`,
`rl.engine=megatron`): megatron-core 0.16.1's DynamicInferenceEngine (paged KV cache,
in-flight batching, chunked prefill, CUDA graphs when the model config asks for them) driven
with add_request / step_modern through a GPTInferenceWrapper around the very GPTModel we
train, returning our `Result`s so that generate() hands callers the same Rollout.

UNVERIFIED: it needs a GPU with flash-attn >= 2.7.3, which no machine of this project has had;
benchmarks/gpu/check.sh compares it with our engine (greedy tokens, log-probs) where it can.

What it serves (config/engine.py holds the rules, checked before start): PP=1 without vpp,
bf16/fp16, temperature 0 or 1 (megatron returns log-probs of the raw logits, i.e. at
temperature 1, which is our engine's record at those temperatures), top_p, no stop strings
(megatron matches stop words as token ids). Samples follow megatron's CUDA generator seeded
with our seed: not the same samples as our engine, nor layout-independent. Megatron's padding
columns of the vocabulary are masked to -inf while it runs, so neither sampling nor the
log-prob's softmax sees them, as in ours. The KV cache (and any CUDA graphs) are freed before
generate() returns, i.e. before the training step.
"""
from __future__ import annotations

import gc
from typing import List, Sequence

import torch

from megatron_ext.models.generate import Result, SamplingParams

BLOCK_TOKENS = 256  # megatron's default KV block


def megatron_sampling_params(params: SamplingParams, eos_id: int):
    """megatron's SamplingParams for ours: greedy is top_k=1 (its argmax branch); top_p=1 (off)
    is its 0.0; log-probs of the generated tokens only; EOS ends a request."""
    from megatron.core.inference.sampling_params import SamplingParams as MegatronParams
    greedy = params.temperature == 0
    return MegatronParams(
        temperature=1.0 if greedy else float(params.temperature), top_k=1 if greedy else 0,
        top_p=0.0 if greedy or params.top_p >= 1 else float(params.top_p),
        return_log_probs=True, skip_prompt_log_probs=True,
        num_tokens_to_generate=params.max_new_tokens, termination_id=eos_id)


def to_results(requests: Sequence, tokenizer, max_new_tokens: int) -> List[Result]:
    """Our Results, in request-id order, from megatron's finished requests (merged records:
    generated_tokens include the EOS that ended one, generated_log_probs one per token)."""
    results = []
    for req in sorted(requests, key=lambda r: r.request_id):
        if req.status is not None and req.status.name == "FAILED":
            raise RuntimeError(f"megatron's engine failed request {req.request_id}: "
                               f"{[str(e) for e in getattr(req, 'events', [])]}")
        tokens = [int(t) for t in req.generated_tokens]
        logprobs = [float(x) for x in req.generated_log_probs or ()]
        if not tokens or len(logprobs) != len(tokens) or len(tokens) > max_new_tokens:
            raise RuntimeError(f"megatron's request {req.request_id} returned {len(tokens)} "
                               f"tokens and {len(logprobs)} log-probs (max_new_tokens="
                               f"{max_new_tokens}); expected one log-prob per token")
        eos = tokens[-1] == tokenizer.eos_id
        text = tokenizer.decode(tokens[:-1] if eos else tokens)
        results.append(Result(req.request_id, tokens, logprobs, text,
                              "eos" if eos else "length"))
    return results


class _Tokenizer:
    """What megatron's engine calls on a tokenizer (it detokenizes every finished request),
    on ours."""

    def __init__(self, tokenizer):
        self.eod, self.bos = tokenizer.eos_id, getattr(tokenizer, "bos_id", None)
        self.detokenize, self.tokenize = tokenizer.decode, getattr(tokenizer, "encode", None)


def _mask_padding(output_layer, vocab_size: int, padded: int):
    """A forward hook on the output layer setting megatron's padding columns to -inf (the
    layer's output is this TP rank's shard of the padded vocabulary, or all of it)."""
    from megatron.core import parallel_state as ps

    def hook(module, args, output):
        logits, bias = output
        start = 0 if logits.shape[-1] == padded else (
            ps.get_tensor_model_parallel_rank() * logits.shape[-1])
        cut = max(vocab_size - start, 0)
        if cut < logits.shape[-1]:
            logits[..., cut:] = float("-inf")
        return logits, bias

    return output_layer.register_forward_hook(hook)


def kv_buffer_gb(config, num_slots: int, max_len: int, tp: int) -> float:
    """GiB of KV blocks for `num_slots` sequences of `max_len` tokens (+ megatron's dummy
    block), so that no request waits for blocks or is evicted."""
    blocks = num_slots * -(-max_len // BLOCK_TOKENS) + 1
    head_dim = config.kv_channels or config.hidden_size // config.num_attention_heads
    heads = (config.num_query_groups or config.num_attention_heads) // tp
    block_bytes = 2 * config.num_layers * BLOCK_TOKENS * heads * head_dim * \
        config.params_dtype.itemsize
    return blocks * block_bytes / 1024 ** 3


def generate_results(model, prompts: Sequence[Sequence[int]], tokenizer, params: SamplingParams,
                     *, vocab_size: int, seed: int, num_slots: int, max_len: int
                     ) -> List[Result]:
    """One Result per prompt from megatron's dynamic engine (UNVERIFIED, see the module
    docstring). model: one GPTModel (PP=1), in eval mode; every TP rank calls this alike."""
    from megatron.core import parallel_state as ps
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper)
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig)
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)
    from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

    while hasattr(model, "module"):
        model = model.module
    config, tp = model.config, ps.get_tensor_model_parallel_world_size()
    context = DynamicInferenceContext(
        params_dtype=config.params_dtype, num_layers=config.num_layers,
        kv_channels=config.kv_channels, num_attention_heads=config.num_query_groups or
        config.num_attention_heads, max_sequence_length=max_len,
        buffer_size_gb=kv_buffer_gb(config, num_slots, max_len, tp), max_requests=num_slots,
        block_size_tokens=BLOCK_TOKENS, materialize_only_last_token_logits=True)
    wrapper = GPTInferenceWrapper(model, InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=config.params_dtype,
        inference_batch_times_seqlen_threshold=-1, padded_vocab_size=model.vocab_size,
        inference_max_requests=num_slots, inference_max_seq_length=max_len), context)
    controller = TextGenerationController(wrapper, _Tokenizer(tokenizer))
    controller.sampling_rng.manual_seed(seed)
    hook = _mask_padding(model.output_layer, vocab_size, model.vocab_size)
    engine = None
    try:
        engine = DynamicInferenceEngine(controller, context, random_seed=seed)
        sampling = megatron_sampling_params(params, tokenizer.eos_id)
        for i, prompt in enumerate(prompts):
            engine.add_request(i, list(prompt), sampling)
        finished = []
        with torch.inference_mode():
            while engine.has_unfinished_requests():
                finished += engine.step_modern()["finished_request_records"]
        return to_results([record.merge() for record in finished], tokenizer,
                          params.max_new_tokens)
    finally:  # free the KV cache and graphs before the training step
        hook.remove()
        context.deallocate_all_tensors()
        if config.cuda_graph_impl != "none":
            delete_cuda_graphs()
        del engine, controller, wrapper, context
        gc.collect()
        torch.cuda.empty_cache()
