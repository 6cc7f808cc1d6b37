"""The generation engine of eval, RL rollouts and the generate CLI: continuous batching over a
fixed number of sequence slots, recording the log-probs PPO needs as the behaviour policy's.

`Engine` holds `num_slots` slots of a slot-indexed KV cache (models/decode.py: SlotCache and
ChunkDecoder, the lean forward of this rank's chunks). `add_request` queues a prompt, `step`
runs one tick, `drain` runs until every request is finished and returns the results; when a
row finishes, its slot takes the next waiting prompt, whose whole prompt is prefilled in one
pass (right padded) together with the other newly placed prompts. `generate` is the batch
entry its callers use.

Schedule. The slots are split into G groups; one pass of a group produces one token for each of
its rows. With PP the S = pp * vpp virtual stages (megatron's interleaved order: chunk v of
rank r is stage v * pp + r) form a ring, and at tick t stage s runs the pass that started at
tick t - s, of group (t - s) mod S when that is < G: the G stages t - G + 1 .. t (mod S) work.
The default G = pp gives every rank exactly one pass per tick (pp consecutive stages hold each
rank once), the largest passes that keep every rank busy: a smaller G idles ranks, and G = S
runs vpp passes of 1/vpp the rows per rank and tick, the same arithmetic in vpp times the
calls (at PP=2 x VPP=2, batch 16 to 128, G=4 gave 0.55-0.97x the tokens/s of G=2 in 20 of
21 A/B points; benchmarks/generation.py --only pp --pp-vpp 2). At PP=2, G=1 gave 0.75-0.99x of
G=2; at PP=2 x VPP=2 and batch <= 32 it gave 1.2x (the last stage's sampling has a fixed cost
of ~0.27 ms a pass, paid G times a round), equal at 64 and 128. Each tick
a rank sends one message to the next rank and receives one from the previous (one isend/irecv pair,
posted after its compute and waited before the next tick's): the hidden states of its chunks,
and from the last stage the sampled token ids (never logits) back to stage 0. Which request
sits in which slot is decided by the same deterministic scheduler on every rank. Finished rows
(EOS, stop strings) are looked for every `check_every` tokens of a row (that many rounds of S
ticks), not every token: the done state
lives on the last stage's device until then, when it reads it to the host, scans only the new
text of each row for stop strings and broadcasts the finished results over the PP group;
a row's length limit is known to every rank without a sync. A finished row may decode a few
tokens more before it is seen; they are discarded.

Sampling is independent of the schedule and the layout: token j of request i is the Gumbel-max
of the temperature- and top-p-adjusted log-probs with noise hashed on the device from (seed,
i, j), so the same seed gives the same samples whatever the slot count, refill order, TP or PP.
The last stage's TP ranks all sample identically from the TP-gathered logits. Greedy is argmax.

Log-probs: `logprobs[i, j]` is log softmax(logits / temperature)[tokens[i, j]] given
tokens[i, :j], with the vocab cut to `vocab_size` and no top-p truncation, as verl records
them; the trainer must compute the new policy's log-probs the same way
(`logprobs_from_logits(..., vocab_size=, temperature=)`), so the first PPO ratio is exactly 1.
Greedy rollouts (temperature 0) record log-probs at temperature 1;
`SamplingParams.logprob_temperature` records them at another one (the generate CLI: 1).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.config.engine import resolve_cuda_graphs
from megatron_ext.models.decode import ChunkDecoder, SlotCache
from megatron_ext.models.decode_graph import DecodeGraphs, progression, unsupported
from megatron_ext.training.collectives import broadcast_list, broadcast_object
from parallel.p2p import ring_shift


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 64  # response length limit
    temperature: float = 1.0  # 0: greedy (argmax)
    top_p: float = 1.0  # nucleus mass; 1: off
    stop: Sequence[str] = ()  # stop when the response text contains one of these
    # the temperature the log-probs are recorded at (None: the sampling one; greedy: 1)
    logprob_temperature: Optional[float] = None

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if any(not s for s in self.stop):
            raise ValueError(f"stop={list(self.stop)} holds an empty string; remove it")
        if self.logprob_temperature is not None and self.logprob_temperature <= 0:
            raise ValueError(f"logprob_temperature={self.logprob_temperature} must be > 0 "
                             "(None: the sampling temperature)")

    def recorded(self, logits: torch.Tensor, sampling: Optional[torch.Tensor]) -> torch.Tensor:
        """The log-probs recorded for `logits`: `sampling` (the sampling temperature's, None
        when greedy) when they are at the recording temperature, else computed at it."""
        at = self.logprob_temperature or (self.temperature if sampling is not None else 1.0)
        if sampling is not None and at == self.temperature:
            return sampling
        return F.log_softmax(logits / at, dim=-1)


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


@dataclasses.dataclass
class Result:
    """One finished request."""

    request: int  # the id add_request returned
    tokens: List[int]  # the response: EOS and stop-string tokens included
    logprobs: List[float]  # per response token
    text: str  # the response text without EOS and without the stop string
    finish_reason: str  # eos | stop | length


_MASK = 0xFFFFFFFF


def _mix(h):
    """A 32-bit integer hash of int64 values (a tensor or a Python int) in [0, 2^32); the
    multipliers are < 2^31 so no product leaves int64 (the same bits on every device)."""
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _MASK
    h = ((h ^ (h >> 15)) * 0x5BD1E995) & _MASK
    return h ^ (h >> 16)


def _mix_(h: torch.Tensor, first: bool = True) -> torch.Tensor:
    """`_mix` in place on a fresh int64 tensor: the same bits, without a new tensor per op
    (the sampler's per-token cost on a small model is these ops' dispatch). first=False: the
    caller did the first xor-shift (it distributes over xor, so of h = a ^ b each part can
    take its own on fewer elements)."""
    if first:
        h.bitwise_xor_(h >> 16)
    h.mul_(0x7FEB352D).bitwise_and_(_MASK)
    h.bitwise_xor_(h >> 15).mul_(0x5BD1E995).bitwise_and_(_MASK)
    return h.bitwise_xor_(h >> 16)


_COLUMNS: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _gumbel(seed: int, requests: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """`[n, vocab]` fp32 Gumbel noise, a function of (seed, request, step, token) only."""
    low = _mix(seed & _MASK) ^ ((seed >> 32) & _MASK)  # the seed's part, on the host
    row = _mix_(_mix_(requests ^ _mix(low)).bitwise_xor_(steps))
    key = (vocab, requests.device)
    if key not in _COLUMNS:  # each token's part, after the first xor-shift
        column = torch.arange(vocab, device=requests.device) * 0x9E3779B9 & _MASK
        _COLUMNS[key] = column ^ (column >> 16)
    h = _mix_(_mix_(row.bitwise_xor_(row >> 16)[:, None] ^ _COLUMNS[key][None], first=False))
    uniform = (h >> 8).float().add_(0.5).mul_(2.0 ** -24)  # in (0, 1)
    return uniform.log_().neg_().log_().neg_()


def _sample(logits: torch.Tensor, params: SamplingParams, seed: int, requests: torch.Tensor,
            steps: torch.Tensor):
    """(token `[n]`, its log-prob `[n]`) from fp32 logits `[n, v]` of rows (request, step)."""
    if params.temperature == 0:
        token = logits.argmax(dim=-1)
        return token, params.recorded(logits, None).gather(-1, token[:, None]).squeeze(-1)
    logprobs = F.log_softmax(logits if params.temperature == 1 else logits / params.temperature,
                             dim=-1)
    scores = logprobs
    if params.top_p < 1:
        sorted_logp, order = logprobs.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        # drop a token when the more likely ones already reach top_p (the first always stays)
        drop = torch.zeros_like(logprobs, dtype=torch.bool).scatter(
            -1, order, probs.cumsum(dim=-1) - probs >= params.top_p)
        scores = logprobs.masked_fill(drop, float("-inf"))
    token = (scores + _gumbel(seed, requests, steps, logits.shape[-1])).argmax(dim=-1)
    return token, params.recorded(logits, logprobs).gather(-1, token[:, None]).squeeze(-1)


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


def _aligned(size: int) -> int:
    """Bytes a message part takes: a multiple of 8, so that every part can be viewed as its
    dtype in place."""
    return -(-size // 8) * 8


def _pack(parts: List[torch.Tensor], device) -> torch.Tensor:
    """One uint8 message of `parts` (each padded to `_aligned`; 8 bytes when empty)."""
    out = []
    for part in parts:
        data = part.reshape(-1).view(torch.uint8)
        out += [data, data.new_zeros(_aligned(len(data)) - len(data))]
    return torch.cat(out) if out else torch.zeros(8, dtype=torch.uint8, device=device)


class _StopScan:
    """The first response token whose text completes a stop string, decoding only the new tail
    of a row plus an overlap of 4 tokens per character of the longest stop string (a character
    is at most 4 bytes, a token at least one), so a scan costs the new tokens, not the row."""

    def __init__(self, stop: Sequence[str], tokenizer):
        self.stop, self.decode = tuple(stop), tokenizer.decode
        self.overlap = 4 * max(map(len, self.stop), default=0)

    def first(self, tokens: List[int], start: int, end: int) -> Optional[int]:
        """The first j in [start, end) whose text tokens[:j + 1] holds a stop string, given
        that tokens[:start] holds none."""
        if not self.stop or start >= end:
            return None
        window = max(0, start - self.overlap)
        if not any(s in self.decode(tokens[window:end]) for s in self.stop):
            return None
        for j in range(start, end):  # a hit: find the token that completes it
            text = self.decode(tokens[window:j + 1])
            if any(s in text for s in self.stop):
                return j
        return None


@dataclasses.dataclass
class _Rows:
    """ChunkDecoder arguments of one kind of rows of a pass (decode or prefill)."""

    slots: torch.Tensor  # [n]
    positions: torch.Tensor  # [n, t]
    lengths: torch.Tensor  # [n]
    kv_len: int
    ids: Optional[torch.Tensor] = None  # prefill: the prompts [n, t], on the first stage
    view: Optional[slice] = None  # decode of a whole group in slot order: its cache slice


@dataclasses.dataclass
class _Pass:
    """One token for each row of a group, travelling through the stages."""

    group: int
    rows: List[Tuple[int, int]]  # (slot, request): the decode rows, then the prefill rows
    steps: List[int]  # the response index each row produces
    decode: Optional[_Rows]
    prefill: Optional[_Rows]
    keep: Optional[torch.Tensor]  # rows of the group's last tokens that feed decode (None: all)
    requests: Optional[torch.Tensor]  # [n] on the last stage: the sampler's noise index
    steps_t: Optional[torch.Tensor]  # [n] on the last stage


class Engine:
    """Continuous batching over `num_slots` slots (see the module docstring).

    model: a GPTModel (or a DDP wrapper of one), or this rank's list of virtual-stage chunks as
    `build_gpt_chunks` returns them. Every rank of the model's TP and PP groups makes the same
    calls (add_request, step, drain) with the same arguments and gets the same results.
    max_len: the longest prompt + response a slot holds. seed: the sampler's (the same on
    every rank). check_every: finished rows are looked for every this many tokens per row.
    groups: G, the slot groups in flight, 1 to pp * vpp (None: pp, one pass per rank and
    tick); the tokens do not depend on it.
    cuda_graphs: decode passes replay CUDA graphs of fixed shapes (models/decode_graph.py;
    the model on CUDA). fixed_shape: decode passes run at those fixed shapes without graphs
    (what the CPU tests check of the graphs' bucketing; implied by cuda_graphs).
    """

    def __init__(self, model, tokenizer, params: SamplingParams, *, vocab_size: int,
                 num_slots: int, max_len: int, seed: int = 0, tp_group=None, pp_group=None,
                 check_every: int = 4, groups: Optional[int] = None, cuda_graphs: bool = False,
                 fixed_shape: bool = False):
        params.check()
        if num_slots < 1 or check_every < 1:
            raise ValueError(f"num_slots={num_slots} and check_every={check_every} must be >= 1")
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        inner = [_unwrap(c) for c in self.chunks]
        self.pp = 1 if pp_group is None else dist.get_world_size(pp_group)
        if self.pp == 1 and not (inner[0].pre_process and inner[-1].post_process):
            raise ValueError("the model is one pipeline stage of several (pre_process/"
                             "post_process is False); pass pp_group, megatron's pipeline group")
        if max_len > inner[0].max_sequence_length:
            raise ValueError(f"max_len={max_len} (longest prompt + max_new_tokens) exceeds the "
                             f"model's max_sequence_length={inner[0].max_sequence_length}; "
                             "shorten them")
        self.params, self.tokenizer, self.vocab, self.seed = params, tokenizer, vocab_size, seed
        self.max_len, self.pp_group = max_len, pp_group
        self.rank = 0 if self.pp == 1 else dist.get_rank(pp_group)
        self.stages = self.pp * len(self.chunks)
        self.groups = self.pp if groups is None else groups
        if not 1 <= self.groups <= self.stages:
            raise ValueError(f"groups={groups} must be in [1, stages={self.stages}] (pp * vpp); "
                             "None takes pp")
        self.sync_every = check_every * self.stages  # a row gets a token every S ticks
        if self.pp > 1:
            self.last_rank = dist.get_global_rank(pp_group, self.pp - 1)
        self.is_last = inner[-1].post_process
        config = inner[0].config
        self.hidden, self.dtype = config.hidden_size, config.pipeline_dtype or config.params_dtype
        self.device = next(inner[0].parameters()).device
        self.cache = SlotCache(self.chunks, num_slots, max_len)
        self.decoder = ChunkDecoder(self.chunks, self.cache)
        self.stop = _StopScan(params.stop, tokenizer)
        # the scheduler, the same on every rank
        self.group_slots = [list(range(g, num_slots, self.groups)) for g in range(self.groups)]
        self.group_views = [progression(slots) for slots in self.group_slots]
        self.graphs = (DecodeGraphs(self.decoder, groups=self.group_slots, hidden=self.hidden,
                                    dtype=self.dtype, graphs=cuda_graphs)
                       if cuda_graphs or fixed_shape else None)
        self.slot_request: List[Optional[int]] = [None] * num_slots
        self.prompts: List[List[int]] = []
        self.next_step: List[int] = []  # per request: the response index of its next pass
        self.completed: List[int] = []  # per request: tokens the last stage has sampled
        self.waiting: Deque[int] = collections.deque()
        self.active: Dict[int, int] = {}  # placed, unfinished request -> its slot
        self.results: Dict[int, Result] = {}  # finished since the last drain
        self.finished = 0
        self.prefills = 0  # rows prefilled so far
        self.passes: Dict[int, _Pass] = {}  # start tick -> pass
        self.last: List[Optional[_Pass]] = [None] * self.groups  # each group's latest pass
        self.tokens: List[Optional[torch.Tensor]] = [None] * self.groups  # its sampled tokens
        self.tick, self.pending = 0, None
        # the last stage's record of every request's samples (on the device until a check)
        self.sampled = torch.zeros(0, params.max_new_tokens, dtype=torch.long, device=self.device)
        self.logprobs = torch.zeros(0, params.max_new_tokens, device=self.device)
        self.eos_at = torch.zeros(0, dtype=torch.long, device=self.device)
        self.host: List[List[int]] = []  # per request: its sampled tokens read so far
        self.checked: List[int] = []  # per request: tokens scanned for stop strings

    def add_request(self, prompt_ids: Sequence[int]) -> int:
        """Queue a prompt (token ids); returns its request id (0, 1, ... in call order), which
        with the seed decides its samples."""
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise ValueError("a prompt must hold at least one token id")
        if len(ids) + self.params.max_new_tokens > self.max_len:
            raise ValueError(f"a prompt of {len(ids)} tokens + max_new_tokens="
                             f"{self.params.max_new_tokens} exceeds the engine's max_len="
                             f"{self.max_len}; make the engine with a larger max_len")
        request = len(self.prompts)
        self.prompts.append(ids)
        self.next_step.append(0)
        self.completed.append(0)
        self.host.append([])
        self.checked.append(0)
        self.waiting.append(request)
        if self.is_last and request >= len(self.eos_at):  # grow the record, doubling
            grow = max(request + 1, 2 * len(self.eos_at)) - len(self.eos_at)
            width = self.params.max_new_tokens
            self.sampled = torch.cat([self.sampled, self.sampled.new_zeros(grow, width)])
            self.logprobs = torch.cat([self.logprobs, self.logprobs.new_zeros(grow, width)])
            self.eos_at = torch.cat([self.eos_at, self.eos_at.new_full((grow,), width)])
        return request

    def unfinished(self) -> int:
        return len(self.prompts) - self.finished

    def drain(self) -> List[Result]:
        """Step until every request is finished; the results finished since the last drain,
        by request id."""
        while self.unfinished():
            self.step()
        results, self.results = [self.results[r] for r in sorted(self.results)], {}
        return results

    def release(self) -> None:
        """Free the KV cache (before a training step); the engine cannot be used after."""
        self.pending = None  # drain leaves none in flight; after an error, drop it
        if self.graphs is not None:
            self.graphs.release()
        self.cache.release()

    def step(self) -> None:
        """One tick: the stages of this rank that hold a pass run it, then the messages of the
        next tick are posted."""
        inbound = None
        if self.pending is not None:
            inbound, self.pending = self.pending.wait(), None
        t = self.tick
        if t > 0 and (t % self.sync_every == 0 or self._idle(t)):
            self._check()
        if not self.unfinished():  # what is still in flight decodes finished rows: drop it
            self.passes.clear()
            self.last, self.tokens = [None] * self.groups, [None] * self.groups
            return
        pas = self._schedule(t)
        if pas is not None:
            self.passes[t] = pas
        received = self._unpack(inbound, t) if inbound is not None else {}
        outbound = []
        for v in range(len(self.chunks)):
            stage = v * self.pp + self.rank
            pas = self.passes.get(t - stage)
            if pas is None:
                continue
            if stage == 0:
                tokens = self.tokens[pas.group]
                if pas.keep is not None:
                    tokens = tokens.index_select(0, pas.keep)
                inputs = (None if pas.decode is None else tokens[:, None],
                          None if pas.prefill is None else pas.prefill.ids)
            else:
                inputs = received[v]
            out = [None if rows is None else
                   self._forward(v, x, rows, pas.group if rows is pas.decode else None)
                   for x, rows in zip(inputs, (pas.decode, pas.prefill))]
            if stage == self.stages - 1:
                tokens = self._sample(pas, torch.cat([o for o in out if o is not None]))
                if self.pp == 1:
                    self.tokens[pas.group] = tokens
                else:
                    outbound.append(tokens)
            else:
                outbound.extend(o.to(self.dtype) for o in out if o is not None)
        if self.pp > 1:
            size = sum(_aligned(n) for _, pas, stage in self._inbound(t + 1)
                       for _, _, n in self._layout(pas, stage))
            self.pending = ring_shift(_pack(outbound, self.device), self.pp_group,
                                      received=torch.empty(max(size, 8), dtype=torch.uint8,
                                                           device=self.device))
        done = self.passes.get(t - self.stages + 1)  # the pass the last stage finished
        if done is not None:
            for (_, request), step in zip(done.rows, done.steps):
                self.completed[request] = step + 1
        for start in [s for s in self.passes if s <= t - self.stages]:
            del self.passes[start]  # its tokens reached stage 0 this tick
        self.tick += 1

    def _forward(self, v: int, x, rows: _Rows, group: Optional[int]) -> torch.Tensor:
        """Chunk v on a pass's prefill rows, or its decode rows of `group`: at fixed shapes
        when set; else as they are, a whole group's attending over its cache slice."""
        if group is not None and self.graphs is not None:
            return self.graphs(v, x, rows.slots, rows.positions, rows.kv_len, group)
        return self.decoder(v, x, rows.slots, rows.positions, rows.lengths, rows.kv_len,
                            rows.view)

    def _idle(self, t: int) -> bool:
        """Nothing in flight and nothing to schedule: the last results are waiting."""
        return (not any(start > t - self.stages for start in self.passes) and not self.waiting
                and all(r is None for r in self.slot_request))

    def _schedule(self, t: int) -> Optional[_Pass]:
        """The next pass of group t mod S (none when that is >= G): its rows still running,
        then waiting prompts in its free slots."""
        g = t % self.stages
        if g >= self.groups:  # G < S: this tick starts no pass
            return None
        last = self.last[g]
        rows, steps, keep = [], [], []
        for i, (slot, request) in enumerate(last.rows if last is not None else ()):
            if self.slot_request[slot] == request:
                rows.append((slot, request))
                steps.append(self.next_step[request])
                keep.append(i)
        n_decode = len(rows)
        for slot in self.group_slots[g]:
            if self.slot_request[slot] is None and self.waiting:
                request = self.waiting.popleft()
                self.slot_request[slot], self.active[request] = request, slot
                rows.append((slot, request))
                steps.append(0)
        if not rows:
            self.last[g] = None
            return None
        for (slot, request), step in zip(rows, steps):
            self.next_step[request] = step + 1
            if step + 1 == self.params.max_new_tokens:
                self.slot_request[slot] = None  # its last token is on the way: refill the slot
        pas = self._tensors(g, rows, steps, n_decode, keep, last)
        self.last[g] = pas
        return pas

    def _tensors(self, g, rows, steps, n_decode, keep, last) -> _Pass:
        """The decoder and sampler arguments of a pass; when its rows are the last pass's, from
        that pass's tensors on the device (no host-to-device copy)."""
        def tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        same = (last is not None and last.prefill is None and n_decode == len(rows)
                == len(last.rows))
        decode = prefill = requests = steps_t = None
        if same:
            d = last.decode
            decode = _Rows(d.slots, d.positions + 1, d.lengths, d.kv_len + 1, view=d.view)
            if self.is_last:
                requests, steps_t = last.requests, last.steps_t + 1
        else:
            if n_decode:
                dec = rows[:n_decode]
                ends = [len(self.prompts[r]) + j for (_, r), j in zip(dec, steps)]
                slots = [s for s, _ in dec]
                decode = _Rows(tensor(slots), tensor(ends)[:, None] - 1,
                               torch.ones(n_decode, dtype=torch.long, device=self.device),
                               max(ends), view=(self.group_views[g] if slots ==
                                                self.group_slots[g] else None))
            if len(rows) > n_decode:
                new = rows[n_decode:]
                lens = [len(self.prompts[r]) for _, r in new]
                ids = None
                if self.rank == 0:  # right padded with token 0, which no position attends
                    ids = tensor([self.prompts[r] + [0] * (max(lens) - len(self.prompts[r]))
                                  for _, r in new])
                prefill = _Rows(tensor([s for s, _ in new]), torch.arange(
                    max(lens), device=self.device).expand(len(new), -1), tensor(lens),
                    max(lens), ids)
                self.prefills += len(new)
            if self.is_last:
                requests, steps_t = tensor([r for _, r in rows]), tensor(steps)
        keep_t = None if last is None or len(keep) == len(last.rows) else tensor(keep)
        return _Pass(g, rows, steps, decode, prefill, keep_t, requests, steps_t)

    def _sample(self, pas: _Pass, logits: torch.Tensor) -> torch.Tensor:
        """Sample the pass's tokens and record them; the tokens `[n]`."""
        token, logp = _sample(logits[:, :self.vocab], self.params, self.seed, pas.requests,
                              pas.steps_t)
        self.sampled[pas.requests, pas.steps_t] = token
        self.logprobs[pas.requests, pas.steps_t] = logp
        eos = torch.where(token == self.tokenizer.eos_id, pas.steps_t,
                          self.params.max_new_tokens)
        self.eos_at[pas.requests] = torch.minimum(self.eos_at[pas.requests], eos)
        return token

    def _layout(self, pas: _Pass, stage: int):
        """(dtype, shape, bytes) of each tensor stage `stage` sends on for pass `pas`."""
        if stage == self.stages - 1:
            return [(torch.long, (len(pas.rows),), 8 * len(pas.rows))]
        out = []
        for rows in (pas.decode, pas.prefill):
            if rows is not None:
                t, n = rows.positions.shape[1], rows.positions.shape[0]
                size = t * n * self.hidden * self.dtype.itemsize
                out.append((self.dtype, (t, n, self.hidden), size))
        return out

    def _inbound(self, t: int):
        """(chunk v of the previous rank, its pass, its stage) of each message of tick t: that
        rank's outputs of tick t - 1, in chunk order."""
        prev = (self.rank - 1) % self.pp
        for v in range(len(self.chunks)):
            stage = v * self.pp + prev
            pas = self.passes.get(t - 1 - stage)
            if pas is not None:
                yield v, pas, stage

    def _unpack(self, inbound: torch.Tensor, t: int) -> Dict[int, Tuple]:
        """Split the previous rank's message: the inputs (decode, prefill) of this rank's
        chunks; the last stage's tokens (on rank 0) go to their group."""
        received, offset = {}, 0
        for v, pas, stage in self._inbound(t):
            parts = []
            for dtype, shape, size in self._layout(pas, stage):
                parts.append(inbound[offset:offset + size].view(dtype).view(shape))
                offset += _aligned(size)
            if stage == self.stages - 1:
                self.tokens[pas.group] = parts[0]
            else:
                it = iter(parts)
                received[v + 1 if self.rank == 0 else v] = tuple(
                    None if rows is None else next(it) for rows in (pas.decode, pas.prefill))
        return received

    def _check(self) -> None:
        """Find the finished requests (on the last stage, then on every PP rank) and free
        their slots."""
        finished = self._finished() if self.is_last else None
        if self.pp > 1:
            finished = broadcast_list(finished, src=self.last_rank, group=self.pp_group)
        for result in finished:
            slot = self.active.pop(result.request)
            if self.slot_request[slot] == result.request:
                self.slot_request[slot] = None
            self.results[result.request] = result
        self.finished += len(finished)

    def _finished(self) -> List[Result]:
        """The last stage: read the new samples of the running requests to the host and end a
        request at its EOS, at the token completing a stop string, or at its length limit."""
        rows = [r for r in sorted(self.active) if self.completed[r] > len(self.host[r])]
        if not rows:
            return []
        index = torch.tensor(rows, device=self.device)
        low = min(len(self.host[r]) for r in rows)
        block = self.sampled[index, low:max(self.completed[r] for r in rows)].tolist()
        eos_at = self.eos_at[index].tolist()
        ends = []
        for r, new, eos in zip(rows, block, eos_at):
            tokens, n = self.host[r], self.completed[r]
            tokens.extend(new[len(tokens) - low:n - low])
            scanned = min(n, eos)  # an EOS token is not scanned for stop strings
            stop = self.stop.first(tokens, self.checked[r], scanned)
            self.checked[r] = scanned
            if stop is not None:
                ends.append((r, stop + 1, "stop"))
            elif eos < n:
                ends.append((r, eos + 1, "eos"))
            elif n == self.params.max_new_tokens:
                ends.append((r, n, "length"))
        if not ends:
            return []
        index = torch.tensor([r for r, _, _ in ends], device=self.device)
        logprobs = self.logprobs[index].tolist()
        results = []
        for (r, n, reason), logp in zip(ends, logprobs):
            tokens = self.host[r][:n]
            if reason == "stop":
                text = self.tokenizer.decode(tokens)
                text = text[:min(at for at in map(text.find, self.stop.stop) if at >= 0)]
            else:
                text = self.tokenizer.decode(tokens[:-1] if reason == "eos" else tokens)
            results.append(Result(r, tokens, logp[:n], text, reason))
            self.host[r] = []
        return results


def _shared_seed(generator: torch.Generator, tp_group, pp_group) -> int:
    """A sampler seed drawn from `generator` on the last stage's TP rank 0, on every rank."""
    seed = int(torch.randint(2 ** 62, (), generator=generator, device=generator.device))
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        seed = broadcast_object(seed, src=dist.get_global_rank(tp_group, 0), group=tp_group)
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        last = dist.get_global_rank(pp_group, dist.get_world_size(pp_group) - 1)
        seed = broadcast_object(seed, src=last, group=pp_group)
    return seed


def generate(model, prompts: Sequence[Sequence[int]], tokenizer, params: SamplingParams, *,
             vocab_size: int, generator: Optional[torch.Generator], tp_group=None,
             pp_group=None, num_slots: Optional[int] = None, engine: str = "ours",
             cuda_graphs: str = "auto") -> Rollout:
    """Sample one response per prompt (repeat a prompt in `prompts` for a GRPO group).

    model: a GPTModel (or a DDP wrapper of one), or this rank's list of virtual-stage chunks as
    `build_gpt_chunks` returns them; it runs in eval mode, and its training flag is restored.
    prompts: token ids, each non-empty, the same on every TP and PP rank.
    tokenizer: has eos_id, pad_id and decode(ids). vocab_size: the real vocabulary (megatron's
    padding columns are never sampled). generator: seeds the sampler (None only for greedy);
    the one of the last stage's TP rank 0 decides and the other ranks follow it; seed it
    differently across DP ranks. tp_group / pp_group: megatron's TP and PP groups when > 1;
    every rank of both gets the same Rollout. num_slots: sequences decoded at once (None: all
    prompts); the samples do not depend on it. engine: ours | megatron | auto (config/engine.py;
    megatron: models/megatron_engine.py, unverified, with its own samples). cuda_graphs:
    auto | true | false, our engine's decode passes replayed from CUDA graphs
    (models/decode_graph.py; auto: where the model is on CUDA, config/engine.py).
    A row stops at EOS, when its text contains a stop string, or after max_new_tokens.
    """
    params.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if params.temperature > 0 and generator is None:
        raise ValueError("sampling (temperature > 0) needs a seeded torch.Generator")
    seed = 0 if params.temperature == 0 else _shared_seed(generator, tp_group, pp_group)
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    slots = len(prompts) if num_slots is None else min(num_slots, len(prompts))
    max_len = max(len(p) for p in prompts) + params.max_new_tokens
    backend = _backend(engine, chunks, params, pp_group)
    graphs = backend == "ours" and resolve_cuda_graphs(cuda_graphs, "cuda_graphs",
                                                       unsupported(chunks))
    try:
        if backend == "megatron":
            from megatron_ext.models.megatron_engine import generate_results
            results = generate_results(chunks[0], prompts, tokenizer, params,
                                       vocab_size=vocab_size, seed=seed, num_slots=slots,
                                       max_len=max_len)
        else:
            ours = Engine(chunks, tokenizer, params, vocab_size=vocab_size, num_slots=slots,
                          max_len=max_len, seed=seed, tp_group=tp_group, pp_group=pp_group,
                          cuda_graphs=graphs)
            try:
                for p in prompts:
                    ours.add_request(p)
                results = ours.drain()
            finally:
                ours.release()
    finally:
        for c, mode in zip(chunks, was_training):
            c.train(mode)
    return to_rollout(prompts, results, tokenizer, next(chunks[0].parameters()).device)


def _backend(engine: str, chunks, params: SamplingParams, pp_group) -> str:
    """'ours' or 'megatron' for generate(engine=...) on this model and these settings."""
    if engine == "ours":
        return "ours"
    from megatron_ext.config.engine import resolve_engine
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        _unwrap(chunks[0]).config.params_dtype, "fp32")
    return resolve_engine(engine, "engine", temperature=params.temperature, stop=params.stop,
                          pp=1 if pp_group is None else dist.get_world_size(pp_group),
                          vpp=len(chunks), dtype=dtype)


def to_rollout(prompts: Sequence[Sequence[int]], results: Sequence[Result], tokenizer,
               device) -> Rollout:
    """The Rollout of `results` (one per prompt, in order), its tensors on `device`."""
    prompt_lens = [len(p) for p in prompts]
    resp_lens = [len(r.tokens) for r in results]
    length = max(p + n for p, n in zip(prompt_lens, resp_lens))
    tokens = torch.full((len(prompts), length), tokenizer.pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(prompts), length)
    mask = torch.zeros(len(prompts), length)
    for i, (p, r) in enumerate(zip(prompts, results)):
        n, end = len(r.tokens), len(p) + len(r.tokens)
        tokens[i, :end] = torch.tensor(list(p) + r.tokens)
        logprobs[i, len(p):end] = torch.tensor(r.logprobs)
        mask[i, len(p):end] = 1.0
    return Rollout(tokens=tokens.to(device), prompt_lens=torch.tensor(prompt_lens, device=device),
                   response_lens=torch.tensor(resp_lens, device=device),
                   response_mask=mask.to(device), logprobs=logprobs.to(device),
                   texts=[r.text for r in results],
                   finish_reasons=[r.finish_reason for r in results])
