"""The rollout loop against a scripted stand-in model: prompts of different lengths, EOS, stop
strings, the length limit, padding columns, and the sampler (greedy, top-p, seeding). The real
megatron model (KV cache vs full recompute, TP=1 and TP=2) is in tests/dist/test_rl_rollout.py;
the engine's schedule (slots, refills, checks) in tests/unit/test_generate_engine.py."""

import math

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.models.generate import SamplingParams, _sample, generate

from ._scripted import ScriptedModel, use_scripted

TOK = ByteTokenizer()
PADDED_VOCAB = 384  # megatron pads 259 up to a multiple of 128


def scripted(prompts, scripts):
    """Predicts script[i][j] as response token j of prompt i (logit 30, the rest 0), and puts a
    logit of 100 on the padding columns, which the rollout must never sample."""
    def logits_of(tokens):
        logits = torch.zeros(PADDED_VOCAB)
        logits[TOK.vocab_size:] = 100.0
        i = next(i for i, p in enumerate(prompts) if tokens[:len(p)] == p)
        j = len(tokens) - len(prompts[i])
        logits[scripts[i][j] if j < len(scripts[i]) else TOK.pad_id] = 30.0
        return logits
    return ScriptedModel(logits_of)


def test_rollout_truncates_at_eos_stop_and_length(monkeypatch):
    use_scripted(monkeypatch)
    prompts = [TOK.encode(p) for p in ("Q: 1+2\n", "Q: 12*3+4\n", "Q\n", "Q: 5\n")]
    scripts = [TOK.encode("1+2=3\nA: 3\n") + [TOK.eos_id],
               TOK.encode("12*3=36\nSTOP and more"),
               TOK.encode("abcdefghijklmnop"),
               TOK.encode("xy\n\nQ: again")]
    model = scripted(prompts, scripts).train()
    params = SamplingParams(max_new_tokens=12, temperature=1.0, stop=("\nQ:", "STOP"))
    out = generate(model, prompts, TOK, params, vocab_size=TOK.vocab_size,
                   generator=torch.Generator().manual_seed(0))
    assert model.training  # restored
    assert out.finish_reasons == ["eos", "stop", "length", "stop"]
    assert out.texts == ["1+2=3\nA: 3\n", "12*3=36\n", "abcdefghijkl", "xy\n"]
    # generated tokens: through the EOS, through the end of the stop string, up to the limit
    want_resp = [scripts[0], TOK.encode("12*3=36\nSTOP"), scripts[2][:12], TOK.encode("xy\n\nQ:")]
    assert out.response_lens.tolist() == [len(r) for r in want_resp]
    assert out.prompt_lens.tolist() == [len(p) for p in prompts]
    assert out.tokens.shape[1] == max(len(p) + len(r) for p, r in zip(prompts, want_resp))
    for i, (p, r) in enumerate(zip(prompts, want_resp)):
        row = out.tokens[i].tolist()
        end = len(p) + len(r)
        assert row[:end] == p + r and set(row[end:]) <= {TOK.pad_id}
        assert out.response_mask[i].tolist() == [0.0] * len(p) + [1.0] * len(r) + [0.0] * (
            len(row) - end)
    resp = out.response_mask > 0
    assert (out.logprobs[resp] > -1e-9).all() and (out.logprobs[~resp] == 0).all()
    # every prompt prefilled once, in one pass; then one decode call per token
    assert sorted(p for _, p in model.prefills) == sorted(prompts)
    assert model.decode_calls == max(len(r) for r in want_resp) - 1


def test_sampler_greedy_top_p_and_seed():
    n = 4000
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).repeat(n, 1)
    rows, steps = torch.arange(n), torch.zeros(n, dtype=torch.long)
    token, logp = _sample(logits, SamplingParams(temperature=0), 0, rows, steps)
    assert (token == 0).all() and torch.allclose(logp, torch.log(torch.tensor(0.5)))
    token, logp = _sample(logits, SamplingParams(top_p=0.7), 1, rows, steps)
    assert set(token.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    # the recorded log-prob is the tempered softmax's, without the top-p cut (as verl)
    assert torch.allclose(logp, torch.log(probs[:2])[token])
    share = (token == 0).float().mean().item()  # 0.5 / 0.8 of the nucleus
    assert abs(share - 0.625) < 4 * math.sqrt(0.625 * 0.375 / n)
    token, _ = _sample(logits, SamplingParams(), 2, rows, steps)
    freq = torch.bincount(token, minlength=4).float() / n
    assert ((freq - probs).abs() < 4 * (probs * (1 - probs) / n).sqrt()).all(), freq
    token, _ = _sample(logits, SamplingParams(temperature=2.0), 3, rows, steps)
    assert set(token.tolist()) == {0, 1, 2, 3}
    # the noise is a function of (seed, request, step): the same for the same triple
    a = _sample(logits, SamplingParams(), 5, rows, steps)[0]
    assert torch.equal(a, _sample(logits, SamplingParams(), 5, rows, steps)[0])
    assert not torch.equal(a, _sample(logits, SamplingParams(), 6, rows, steps)[0])
    assert not torch.equal(a, _sample(logits, SamplingParams(), 5, rows, steps + 1)[0])
    assert torch.equal(a[1:], _sample(logits[1:], SamplingParams(), 5, rows[1:], steps[1:])[0])


def test_rollout_rejects_bad_requests(monkeypatch):
    use_scripted(monkeypatch)
    model = scripted([[1]], [[2]])
    gen = torch.Generator()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[1], []], TOK, SamplingParams(), vocab_size=259, generator=gen)
    with pytest.raises(ValueError, match="max_sequence_length=1000"):
        generate(model, [[1] * 990], TOK, SamplingParams(max_new_tokens=20), vocab_size=259,
                 generator=gen)
    with pytest.raises(ValueError, match="top_p=0"):
        generate(model, [[1]], TOK, SamplingParams(top_p=0), vocab_size=259, generator=gen)
    with pytest.raises(ValueError, match="needs a seeded torch.Generator"):
        generate(model, [[1]], TOK, SamplingParams(), vocab_size=259, generator=None)
    model.post_process = False
    with pytest.raises(ValueError, match="pass pp_group"):
        generate(model, [[1]], TOK, SamplingParams(), vocab_size=259, generator=gen)
