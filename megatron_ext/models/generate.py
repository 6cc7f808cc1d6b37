"""Batched sampling through a megatron GPTModel with a static KV cache, recording the
log-probs PPO needs as the behaviour policy's.

Prompts of different lengths, without padding inside a sequence: every row sits at positions
0..n-1 of its own sequence, as in training. The cache is prefilled with the first
`min(prompt lengths)` tokens of every row (causal attention, no mask); then one position per
step for all rows together: a row still inside its prompt is fed its next prompt token (the
sample drawn for it is ignored), a row past its prompt appends its sample. So no attention
mask is ever needed (megatron's static context turns the causal mask off after prefill, and
TE ignores custom masks under a causal mask type) and RoPE positions are exact. This is
Megatron-LM's static-batch scheme; the cost is that the longer prompts' tails go one token per
step.

Log-probs: `logprobs[i, j]` is log softmax(logits / temperature)[tokens[i, j]] given
tokens[i, :j], with the vocab cut to `vocab_size` and no top-p truncation, as verl records
them; the trainer must compute the new policy's log-probs the same way
(`logprobs_from_logits(..., vocab_size=, temperature=)`), so the first PPO ratio is exactly 1.
Greedy rollouts (temperature 0) record log-probs at temperature 1.

Parallelism: every step runs the whole pipeline, each stage passing its hidden states to the
next (virtual stages in megatron's interleaved order), on one KV cache per rank. The logits of
the last stage are gathered over TP; its TP rank 0 samples, and that token and log-prob are
broadcast over the TP group, then from the last stage over the PP group, so all ranks extend
their caches with the same token. Sequence parallelism is refused (decode steps are 1 token).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64  # response length limit
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass; 1: off
    stop: Sequence[str] = ()  # stop when the response text contains one of these

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)} holds an empty string; remove it")


@dataclasses.dataclass
class Rollout:
    """A generated batch; every `[b, L]` tensor is aligned with `tokens` (column j is about
    token j). For training, feed tokens[:, :-1], predict tokens[:, 1:], and take
    response_mask[:, 1:] and logprobs[:, 1:] as the loss mask and old_logp."""

    tokens: torch.Tensor  # [b, L] long: prompt, response, then pad_id
    prompt_lens: torch.Tensor  # [b] long
    response_lens: torch.Tensor  # [b] long: generated tokens, EOS and stop-string tokens included
    response_mask: torch.Tensor  # [b, L] fp32: 1 on generated tokens
    logprobs: torch.Tensor  # [b, L] fp32: the sampling policy's log-prob, 0 off the response
    texts: List[str]  # decoded responses without EOS and without the stop string
    finish_reasons: List[str]  # eos | stop | length


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator):
    """(token `[b]`, its log-prob `[b]`) from fp32 logits `[b, v]`."""
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, F.log_softmax(logits, dim=-1).gather(-1, token[:, None]).squeeze(-1)
    logprobs = F.log_softmax(logits / params.temperature, dim=-1)
    probs = logprobs.exp()
    if params.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class _Stages:
    """One forward of this rank's model chunks, chained with the other pipeline ranks: chunk v
    of rank r takes its input from rank r-1 (rank pp-1's chunk v-1 for r = 0) and sends its
    output to rank r+1, as in megatron's interleaved schedule. Returns the gathered logits on
    the last stage, None elsewhere."""

    def __init__(self, chunks, pp_group):
        self.chunks, self.inner = chunks, [_unwrap(c) for c in chunks]
        self.pp = 1 if pp_group is None else dist.get_world_size(pp_group)
        if self.pp == 1 and not (self.inner[0].pre_process and self.inner[-1].post_process):
            raise ValueError("the model is one pipeline stage of several (pre_process/"
                             "post_process is False); pass pp_group, megatron's pipeline group")
        config = self.inner[0].config
        if config.sequence_parallel:
            raise NotImplementedError("rollouts run one token per step, which sequence "
                                      "parallelism cannot split; build the rollout model with "
                                      "sequence_parallel=False")
        self.group, self.config = pp_group, config
        if self.pp > 1:
            rank = dist.get_rank(pp_group)
            self.prev = dist.get_global_rank(pp_group, (rank - 1) % self.pp)
            self.next = dist.get_global_rank(pp_group, (rank + 1) % self.pp)
            self.last = dist.get_global_rank(pp_group, self.pp - 1)
        self.is_last = self.inner[-1].post_process

    def __call__(self, tokens, positions, context) -> Optional[torch.Tensor]:
        for chunk, inner in zip(self.chunks, self.inner):
            if not inner.pre_process:
                hidden = torch.empty(tokens.size(1), tokens.size(0), self.config.hidden_size,
                                     dtype=self.config.pipeline_dtype or self.config.params_dtype,
                                     device=tokens.device)
                dist.recv(hidden, src=self.prev, group=self.group)
                inner.set_input_tensor(hidden)
            out = chunk(tokens, positions, None, inference_context=context,
                        runtime_gather_output=True)
            if inner.post_process:
                return out
            dist.send(out.contiguous(), dst=self.next, group=self.group)
        return None


def generate(model, prompts: Sequence[Sequence[int]], tokenizer, params: SamplingParams, *,
             vocab_size: int, generator: Optional[torch.Generator], tp_group=None,
             pp_group=None) -> Rollout:
    """Sample one response per prompt (repeat a prompt in `prompts` for a GRPO group).

    model: a GPTModel (or a DDP wrapper of one), or this rank's list of virtual-stage chunks as
    `build_gpt_chunks` returns them; it runs in eval mode and no_grad, and its training flag is
    restored. prompts: token ids, each non-empty, the same on every TP and PP rank.
    tokenizer: has eos_id, pad_id and decode(ids). vocab_size: the real vocabulary (megatron's
    padding columns are never sampled). generator: on the model's device, seeded differently
    across DP ranks (None only for greedy); the one of the last stage's TP rank 0 decides and
    the other ranks follow it. tp_group / pp_group: megatron's TP and PP groups when > 1; every
    rank of both gets the same Rollout.
    A row stops at EOS, when its text contains a stop string, or after max_new_tokens.
    """
    params.check()
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    stages = _Stages(chunks, pp_group)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if params.temperature > 0 and generator is None:
        raise ValueError("sampling (temperature > 0) needs a seeded torch.Generator")
    from megatron.core.inference.contexts import StaticInferenceContext

    inner = stages.inner[0]
    device = next(inner.parameters()).device
    b = len(prompts)
    prompt_lens = [len(p) for p in prompts]
    lens = torch.tensor(prompt_lens, device=device)
    total = max(prompt_lens) + params.max_new_tokens
    if total > inner.max_sequence_length:
        raise ValueError(f"longest prompt {max(prompt_lens)} + max_new_tokens "
                         f"{params.max_new_tokens} = {total} exceeds the model's "
                         f"max_sequence_length={inner.max_sequence_length}; shorten them")
    tokens = torch.full((b, total), tokenizer.pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
    logprobs = torch.zeros(b, total, device=device)
    mask = torch.zeros(b, total, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    resp_lens = torch.zeros(b, dtype=torch.long, device=device)
    stop_at = {}  # row -> character index of the stop string in its response text
    tp_src = None
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        tp_src = dist.get_global_rank(tp_group, 0)

    context = StaticInferenceContext(b, total)  # one per rank: its layers' KV caches
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            prev = 0
            for cur in range(min(prompt_lens), total):
                positions = torch.arange(prev, cur, device=device).expand(b, -1)
                logits = stages(tokens[:, prev:cur], positions, context)
                context.sequence_len_offset += cur - prev
                prev = cur
                if stages.is_last:
                    token, logp = _sample(logits[:, -1, :vocab_size].float(), params, generator)
                else:
                    token = torch.empty(b, dtype=torch.long, device=device)
                    logp = torch.empty(b, device=device)
                if tp_src is not None and stages.is_last:
                    dist.broadcast(token, src=tp_src, group=tp_group)
                    dist.broadcast(logp, src=tp_src, group=tp_group)
                if stages.pp > 1:
                    dist.broadcast(token, src=stages.last, group=pp_group)
                    dist.broadcast(logp, src=stages.last, group=pp_group)
                new = (cur >= lens) & ~done
                tokens[:, cur] = torch.where(new, token, tokens[:, cur])
                logprobs[:, cur] = torch.where(new, logp, 0.0)
                mask[:, cur] = new
                resp_lens += new.long()
                eos = new & (token == tokenizer.eos_id)
                done |= eos | (new & (resp_lens >= params.max_new_tokens))
                if params.stop:
                    for i in (new & ~eos).nonzero().flatten().tolist():
                        text = tokenizer.decode(tokens[i, prompt_lens[i]:cur + 1].tolist())
                        hits = [at for at in (text.find(s) for s in params.stop) if at >= 0]
                        if hits:
                            stop_at[i] = min(hits)
                            done[i] = True
                if bool(done.all()):
                    break
    finally:
        for c, inner, mode in zip(chunks, stages.inner, was_training):
            c.train(mode)
            if not inner.pre_process:
                inner.set_input_tensor(None)  # drop the last received hidden state

    texts, finish = [], []
    for i, (start, n) in enumerate(zip(prompt_lens, resp_lens.tolist())):
        response = tokens[i, start:start + n].tolist()
        if i in stop_at:
            reason, text = "stop", tokenizer.decode(response)[:stop_at[i]]
        elif response and response[-1] == tokenizer.eos_id:
            reason, text = "eos", tokenizer.decode(response[:-1])
        else:
            reason, text = "length", tokenizer.decode(response)
        texts.append(text)
        finish.append(reason)
    length = int((lens + resp_lens).max())
    return Rollout(tokens=tokens[:, :length], prompt_lens=lens, response_lens=resp_lens,
                   response_mask=mask[:, :length].float(), logprobs=logprobs[:, :length],
                   texts=texts, finish_reasons=finish)
