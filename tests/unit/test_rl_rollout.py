"""The rollout loop against a scripted stand-in model: prompts of different lengths, EOS, stop
strings, the length limit, padding columns, and the sampler (greedy, top-p, seeding). The real
megatron model (KV cache vs full recompute, TP=1 and TP=2) is in tests/dist/test_rl_rollout.py."""

import types

import pytest
import torch

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.models.generate import SamplingParams, _sample, generate

TOK = ByteTokenizer()
PADDED_VOCAB = 384  # megatron pads 259 up to a multiple of 128


class ScriptedModel(torch.nn.Module):
    """Predicts script[i][j] as response token j of row i (logit 30, the rest 0), and puts a
    logit of 100 on the padding columns, which the rollout must never sample. Checks that it
    is fed each row's own prompt at the right positions."""

    pre_process = post_process = True
    max_sequence_length = 1000
    config = types.SimpleNamespace(sequence_parallel=False)

    def __init__(self, prompts, scripts):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.prompts, self.scripts, self.calls = prompts, scripts, 0

    def forward(self, tokens, positions, mask, *, inference_context, runtime_gather_output):
        assert mask is None and runtime_gather_output and not self.training
        b, s = tokens.shape
        offset = inference_context.sequence_len_offset
        assert torch.equal(positions, torch.arange(offset, offset + s).expand(b, -1))
        logits = torch.zeros(b, 1, PADDED_VOCAB)
        logits[..., TOK.vocab_size:] = 100.0
        for i, (prompt, script) in enumerate(zip(self.prompts, self.scripts)):
            for col in range(s):
                if offset + col < len(prompt):
                    assert tokens[i, col] == prompt[offset + col]
            j = offset + s - len(prompt)  # response index of the token predicted next
            logits[i, 0, script[j] if 0 <= j < len(script) else TOK.pad_id] = 30.0
        self.calls += 1
        return logits


def test_rollout_truncates_at_eos_stop_and_length():
    prompts = [TOK.encode(p) for p in ("Q: 1+2\n", "Q: 12*3+4\n", "Q\n", "Q: 5\n")]
    scripts = [TOK.encode("1+2=3\nA: 3\n") + [TOK.eos_id],
               TOK.encode("12*3=36\nSTOP and more"),
               TOK.encode("abcdefghijklmnop"),
               TOK.encode("xy\n\nQ: again")]
    model = ScriptedModel(prompts, scripts).train()
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
    assert model.calls == out.tokens.shape[1] - min(len(p) for p in prompts)


def test_sampler_greedy_top_p_and_seed():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    token, logp = _sample(logits, SamplingParams(temperature=0), None)
    assert (token == 0).all() and torch.allclose(logp, torch.log(torch.tensor(0.5)))
    gen = torch.Generator().manual_seed(1)
    token, logp = _sample(logits, SamplingParams(top_p=0.7), gen)
    assert set(token.tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3: the nucleus is {0, 1}
    # the recorded log-prob is the tempered softmax's, without the top-p cut (as verl)
    assert torch.allclose(logp, torch.log(torch.tensor([0.5, 0.3]))[token])
    token, _ = _sample(logits, SamplingParams(temperature=2.0), gen)
    assert set(token.tolist()) == {0, 1, 2, 3}
    a = _sample(logits, SamplingParams(), torch.Generator().manual_seed(5))[0]
    b = _sample(logits, SamplingParams(), torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, b)


def test_rollout_rejects_bad_requests():
    model = ScriptedModel([[1]], [[2]])
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
