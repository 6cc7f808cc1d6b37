"""The continuous-batching engine (models/generate.py) against a stand-in model whose logits
are a fixed function of the sequence so far: greedy decoding equals a plain full-recompute
reference, samples do not depend on the slot count or the check interval, slots are refilled,
stop strings are found wherever they fall, prompts of very different lengths share a batch."""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.models.generate import Engine, SamplingParams, generate

from ._scripted import ScriptedModel, use_scripted

TOK = ByteTokenizer()
VOCAB = 384  # padded; 259 real


def random_logits(tokens):
    """Logits that are a pseudo-random function of the sequence, with EOS now and then and the
    padding columns very likely (never to be sampled)."""
    gen = torch.Generator().manual_seed(hash(tuple(tokens)) % (2 ** 31))
    logits = torch.randn(VOCAB, generator=gen) * 2.0
    logits[TOK.vocab_size:] = 50.0
    logits[TOK.eos_id] += 1.5
    return logits


def reference(prompt, params, logits_of=random_logits):
    """Greedy decoding by full recompute: (response tokens, log-probs at temperature 1)."""
    seq, logps = list(prompt), []
    for _ in range(params.max_new_tokens):
        logp = F.log_softmax(logits_of(seq)[:TOK.vocab_size], dim=-1)
        seq.append(int(logp.argmax()))
        logps.append(float(logp[seq[-1]]))
        if seq[-1] == TOK.eos_id:
            break
    return seq[len(prompt):], logps


PROMPTS = [TOK.encode(p) for p in ("Q: 1+2\n", "Q: 12*3+4\n", "Q\n", "Q: 5\n", "a" * 60, "b",
                                   "Q: 7-1\n")]


def run_engine(prompts, params, num_slots, check_every=4, seed=0, model=None):
    model = model or ScriptedModel(random_logits).eval()
    engine = Engine(model, TOK, params, vocab_size=TOK.vocab_size, num_slots=num_slots,
                    max_len=100, seed=seed, check_every=check_every)
    ids = [engine.add_request(p) for p in prompts]
    results = engine.drain()
    assert [r.request for r in results] == ids == list(range(len(prompts)))
    assert engine.unfinished() == 0 and engine.drain() == []
    return results, model, engine


@pytest.mark.parametrize("num_slots,check_every", [(7, 1), (7, 4), (3, 2), (1, 5), (2, 3)])
def test_greedy_equals_full_recompute(monkeypatch, num_slots, check_every):
    use_scripted(monkeypatch)
    params = SamplingParams(max_new_tokens=9, temperature=0)
    results, model, _ = run_engine(PROMPTS, params, num_slots, check_every)
    for prompt, result in zip(PROMPTS, results):
        tokens, logps = reference(prompt, params)
        assert result.tokens == tokens
        assert result.logprobs == pytest.approx(logps, abs=1e-6)
        assert result.finish_reason == ("eos" if tokens[-1] == TOK.eos_id else "length")
    assert any(r.finish_reason == "eos" for r in results)  # some rows end early
    # each prompt prefilled once and whole (the 60-token one with the 1-token one at 7 slots)
    assert sorted(p for _, p in model.prefills) == sorted(PROMPTS)


def test_samples_do_not_depend_on_the_schedule(monkeypatch):
    use_scripted(monkeypatch)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9)
    group = [p for p in PROMPTS[:4] for _ in range(3)]  # GRPO-style repeats: distinct samples
    want, _, _ = run_engine(group, params, 12, seed=11)
    for num_slots, check_every in [(1, 1), (5, 3), (4, 7)]:
        got, _, _ = run_engine(group, params, num_slots, check_every, seed=11)
        assert [(r.tokens, r.logprobs, r.finish_reason) for r in got] == [
            (r.tokens, r.logprobs, r.finish_reason) for r in want], (num_slots, check_every)
    assert len({tuple(r.tokens) for r in want[:3]}) > 1  # repeats of a prompt differ
    other, _, _ = run_engine(group, params, 12, seed=12)
    assert [r.tokens for r in other] != [r.tokens for r in want]
    # the recorded log-prob is the tempered softmax over the real vocab of the model's logits
    for prompt, r in zip(group, want):
        seq = list(prompt)
        for token, logp in zip(r.tokens, r.logprobs):
            want_logp = F.log_softmax(random_logits(seq)[:TOK.vocab_size] / 0.9, dim=-1)[token]
            assert abs(logp - float(want_logp)) < 1e-5
            assert token < TOK.vocab_size
            seq.append(token)


def test_logprobs_recorded_at_another_temperature_keep_the_samples(monkeypatch):
    """logprob_temperature=1 (the generate CLI) draws the same tokens as sampling at 0.9 and
    records each one's log-prob at temperature 1."""
    use_scripted(monkeypatch)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9)
    at_t1 = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, logprob_temperature=1)
    want, _, _ = run_engine(PROMPTS, sampling, 3, seed=5)
    got, _, _ = run_engine(PROMPTS, at_t1, 3, seed=5)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for prompt, r in zip(PROMPTS, got):
        seq = list(prompt)
        for token, logp in zip(r.tokens, r.logprobs):
            assert abs(logp - float(F.log_softmax(random_logits(seq)[:TOK.vocab_size],
                                                  dim=-1)[token])) < 1e-5
            seq.append(token)
    with pytest.raises(ValueError, match="logprob_temperature=0 must be > 0"):
        SamplingParams(logprob_temperature=0).check()


def test_slots_are_refilled_and_checks_are_not_per_token(monkeypatch):
    use_scripted(monkeypatch)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    checks = []
    original = Engine._check
    monkeypatch.setattr(Engine, "_check", lambda self: (checks.append(self.tick), original(self)))
    results, model, engine = run_engine(PROMPTS, params, 2, check_every=4)
    slots = [s for s, _ in model.prefills]
    assert len(slots) == engine.prefills == len(PROMPTS)  # every prompt prefilled exactly once
    assert set(slots) == {0, 1} and slots.count(0) > 1 and slots.count(1) > 1  # refilled
    # finished rows are looked for every 4 ticks (and once when nothing is left in flight)
    assert all(t % 4 == 0 for t in checks[:-1]) and len(checks) <= engine.tick // 4 + 1
    assert model.cache.released is False
    engine.release()
    assert model.cache.released


def scripted_text(script):
    """A model that writes `script` (token ids) whatever the prompt, then EOS."""
    def logits_of(tokens):
        logits = torch.zeros(VOCAB)
        j = len(tokens) - 1  # prompts are one token
        logits[script[j] if j < len(script) else TOK.eos_id] = 30.0
        return logits
    return logits_of


def stop_reference(script, stop, max_new):
    """The first token whose text (the whole response, decoded) holds a stop string."""
    for j in range(min(len(script), max_new)):
        text = TOK.decode(script[:j + 1])
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            return j + 1, text[:min(hits)]
    return None


@pytest.mark.parametrize("check_every", [1, 2, 3, 5, 8])
def test_stop_strings_at_every_boundary(monkeypatch, check_every):
    use_scripted(monkeypatch)
    max_new = 12
    cases = [  # (response text, stop strings)
        ("abcdefghijklmnop", ("def",)),  # split over tokens, wherever a check falls
        ("Xbcdefghijklmnop", ("X",)),  # the very first token
        ("abcdefghijkLmnop", ("kL",)),  # completed by the last token the limit allows
        ("abcdefghijklmnop", ("lm",)),  # completed one past the limit: a length finish
        ("ab\u00e9\u00e9cdefghij", ("\u00e9c", "zz")),  # multi-byte characters, two strings
        ("abcabcabcabcabcd", ("cab", "bca")),  # overlapping candidates: the earliest wins
    ]
    for start in range(0, 8):  # move the hit across the check boundaries
        for text, stop in cases:
            script = TOK.encode("." * start + text)
            model = ScriptedModel(scripted_text(script)).eval()
            params = SamplingParams(max_new_tokens=max_new, temperature=0, stop=stop)
            (result,), _, _ = run_engine([[1]], params, 1, check_every, model=model)
            want = stop_reference(script, stop, max_new)
            if want is None:
                assert (result.finish_reason, result.tokens) == ("length", script[:max_new])
            else:
                assert result.finish_reason == "stop", (start, text)
                assert (len(result.tokens), result.text) == want, (start, text)
                assert result.tokens == script[:want[0]]


def test_generate_batches_prompts_of_very_different_lengths(monkeypatch):
    use_scripted(monkeypatch)
    prompts = [TOK.encode("x" * n) for n in (1, 90, 3, 45, 2)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    model = ScriptedModel(random_logits)
    outs = [generate(model, prompts, TOK, params, vocab_size=TOK.vocab_size, generator=None,
                     num_slots=n) for n in (None, 2)]
    for out in outs:
        for i, prompt in enumerate(prompts):
            tokens, logps = reference(prompt, params)
            n = int(out.response_lens[i])
            assert out.tokens[i, :len(prompt) + n].tolist() == prompt + tokens
            assert out.logprobs[i, len(prompt):len(prompt) + n].tolist() == pytest.approx(logps)
    assert torch.equal(outs[0].tokens, outs[1].tokens)


def test_engine_rejects_bad_requests(monkeypatch):
    use_scripted(monkeypatch)
    model = ScriptedModel(random_logits)
    engine = Engine(model, TOK, SamplingParams(max_new_tokens=10), vocab_size=259, num_slots=2,
                    max_len=20)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request([])
    with pytest.raises(ValueError, match="max_len=20"):
        engine.add_request([1] * 11)
    with pytest.raises(ValueError, match="num_slots=0"):
        Engine(model, TOK, SamplingParams(), vocab_size=259, num_slots=0, max_len=20)
    for groups in (0, 2):  # one stage: G = 1 only
        with pytest.raises(ValueError, match=f"groups={groups} must be in \\[1, stages=1\\]"):
            Engine(model, TOK, SamplingParams(), vocab_size=259, num_slots=2, max_len=20,
                   groups=groups)


def test_requests_added_while_running_get_their_own_samples(monkeypatch):
    use_scripted(monkeypatch)
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    want, _, _ = run_engine(PROMPTS, params, 3, seed=4)
    engine = Engine(ScriptedModel(random_logits).eval(), TOK, params, vocab_size=TOK.vocab_size,
                    num_slots=3, max_len=100, seed=4)
    for p in PROMPTS[:2]:
        engine.add_request(p)
    for _ in range(5):
        engine.step()
    for p in PROMPTS[2:]:  # queued behind the running ones, mid-flight
        engine.add_request(p)
    got = engine.drain()
    assert [(r.request, r.tokens, r.logprobs) for r in got] == [
        (r.request, r.tokens, r.logprobs) for r in want]
