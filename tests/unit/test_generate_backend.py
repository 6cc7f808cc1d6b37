"""generate.engine / rl.engine = auto | ours | megatron: the choice, the config errors before
start, and the pure parts of the megatron adapter (models/megatron_engine.py) on hand-made
inputs. The adapter's GPU path itself is unverified here (benchmarks/gpu/engines.py runs it
where flash-attn imports)."""
import math
import types

import pytest
import torch

from megatron_ext.config.engine import environment_missing, option_missing, resolve_engine
from megatron_ext.config.fields import ConfigError
from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import validate
from megatron_ext.models import megatron_engine as me
from megatron_ext.models.generate import Result, SamplingParams, _backend, to_rollout

OK = dict(temperature=1.0, stop=(), pp=1, vpp=None, dtype="bf16")


class Tok:
    eos_id, pad_id, bos_id = 9, 0, None

    @staticmethod
    def decode(ids):
        return "".join(chr(ord("a") + i) for i in ids)


def _no_cuda() -> bool:
    return not torch.cuda.is_available()


@pytest.mark.skipif(not _no_cuda(), reason="asserts the CPU machine's answer")
def test_auto_resolves_to_ours_here_and_megatron_is_refused_naming_the_fix():
    assert "CUDA" in environment_missing()
    assert resolve_engine("auto", "generate.engine", **OK) == "ours"
    assert resolve_engine("ours", "generate.engine", **OK) == "ours"
    with pytest.raises(ConfigError, match=r"generate.engine=megatron needs a CUDA device.*"
                                          r"use generate.engine=ours"):
        resolve_engine("megatron", "generate.engine", **OK)


def test_each_unsupported_setting_is_named():
    cases = {"pp": (dict(pp=2), "parallel.pp=1"), "vpp": (dict(vpp=2), "parallel.pp=1"),
             "dtype": (dict(dtype="fp32"), "model.dtype=bf16"),
             "temperature": (dict(temperature=0.7), "temperature 0 or 1"),
             "stop": (dict(stop=["\n"]), "no stop strings")}
    for name, (change, words) in cases.items():
        assert words in option_missing(**(OK | change)), name
        with pytest.raises(ConfigError, match=f"rl.engine=megatron needs {words}"):
            resolve_engine("megatron", "rl.engine", env=None, **(OK | change))
        assert resolve_engine("auto", "rl.engine", env=None, **(OK | change)) == "ours"
    assert option_missing(**(OK | dict(temperature=0))) is None
    # nothing blocks it in a given environment: auto and megatron both pick it
    assert resolve_engine("auto", "rl.engine", env=None, **OK) == "megatron"
    assert resolve_engine("megatron", "rl.engine", env=None, **OK) == "megatron"


@pytest.mark.skipif(not _no_cuda(), reason="asserts the CPU machine's answer")
def test_config_validation_refuses_megatron_before_start():
    cfg = compose_config(["model=tiny", "model.dtype=bf16", "generate.engine=megatron"])
    with pytest.raises(ConfigError, match="generate.engine=megatron needs a CUDA device.*"
                                          "generate.engine=ours"):
        validate(cfg, 1)
    validate(cfg, 1, have_fused_norms=None)  # a launcher cannot know the run's machine
    cfg = compose_config(["model=tiny", "generate.engine=megatron", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="needs parallel.pp=1"):
        validate(cfg, 2, have_fused_norms=None)  # a setting is refused anywhere
    validate(compose_config(["model=tiny"]), 1)  # auto is the default and passes
    with pytest.raises(ConfigError, match="generate.engine"):
        validate(compose_config(["model=tiny", "generate.engine=vllm"]), 1)


@pytest.mark.skipif(not _no_cuda(), reason="asserts the CPU machine's answer")
def test_generate_backend_choice_on_this_model():
    chunk = types.SimpleNamespace(config=types.SimpleNamespace(params_dtype=torch.bfloat16))
    assert _backend("auto", [chunk], SamplingParams(), None) == "ours"
    with pytest.raises(ConfigError, match="engine=megatron needs a CUDA device"):
        _backend("megatron", [chunk], SamplingParams(), None)
    fp32 = types.SimpleNamespace(config=types.SimpleNamespace(params_dtype=torch.float32))
    with pytest.raises(ConfigError, match="model.dtype=bf16"):
        _backend("megatron", [fp32], SamplingParams(), None)


def test_sampling_params_translation():
    greedy = me.megatron_sampling_params(SamplingParams(max_new_tokens=7, temperature=0.0), 9)
    assert (greedy.top_k, greedy.temperature, greedy.top_p) == (1, 1.0, 0.0)
    assert (greedy.num_tokens_to_generate, greedy.termination_id) == (7, 9)
    assert greedy.return_log_probs and greedy.skip_prompt_log_probs
    nucleus = me.megatron_sampling_params(SamplingParams(temperature=1.0, top_p=0.9), 9)
    assert (nucleus.top_k, nucleus.temperature) == (0, 1.0)
    assert isinstance(nucleus.top_p, float) and nucleus.top_p == 0.9
    assert me.megatron_sampling_params(SamplingParams(temperature=1.0), 9).top_p == 0.0


def _request(rid, generated, logprobs, status="COMPLETED"):
    from megatron.core.inference.inference_request import (DynamicInferenceRequest,
                                                           DynamicInferenceRequestRecord, Status)
    from megatron.core.inference.sampling_params import SamplingParams as MP
    r = DynamicInferenceRequest(request_id=rid, prompt_tokens=torch.tensor([1, 2]),
                                sampling_params=MP(num_tokens_to_generate=4))
    r.generated_tokens, r.generated_log_probs, r.status = generated, logprobs, Status[status]
    return DynamicInferenceRequestRecord.from_request(r).merge()


def test_requests_map_to_our_results_in_request_order():
    results = me.to_results([_request(1, [3, 4, 5, 6], [-0.5, -1, -2, -3]),
                             _request(0, [2, 9], [-0.25, -0.75])], Tok, max_new_tokens=4)
    assert [r.request for r in results] == [0, 1]
    eos, length = results
    assert (eos.tokens, eos.logprobs, eos.text, eos.finish_reason) == (
        [2, 9], [-0.25, -0.75], "c", "eos")  # EOS kept in tokens, dropped from the text
    assert (length.tokens, length.text, length.finish_reason) == ([3, 4, 5, 6], "defg",
                                                                  "length")


def test_broken_requests_are_errors_not_rollouts():
    with pytest.raises(RuntimeError, match="failed request 0"):
        me.to_results([_request(0, [2], [-1.0], status="FAILED")], Tok, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="1 tokens and 0 log-probs"):
        me.to_results([_request(0, [2], [])], Tok, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="max_new_tokens=1"):
        me.to_results([_request(0, [2, 3], [-1.0, -1.0])], Tok, max_new_tokens=1)


def test_padding_columns_are_masked_on_the_full_and_the_sharded_output(monkeypatch):
    class Out(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.width = width

        def forward(self, x):
            return torch.zeros(*x.shape, self.width), None

    full = Out(8)
    hook = me._mask_padding(full, vocab_size=6, padded=8)
    logits, _ = full(torch.zeros(2, 1))
    assert torch.isinf(logits[..., 6:]).all() and (logits[..., :6] == 0).all()
    lp = torch.log_softmax(logits, -1)
    assert math.isclose(lp[0, 0, 0].item(), -math.log(6), rel_tol=1e-6)  # softmax over 6
    hook.remove()
    assert (full(torch.zeros(1, 1))[0] == 0).all()  # removed: no mask
    from megatron.core import parallel_state as ps
    shard = Out(4)  # TP=2 of a padded 8: rank 1 holds columns 4..7, of which 4, 5 are real
    monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda: 1)
    me._mask_padding(shard, vocab_size=6, padded=8)
    logits, _ = shard(torch.zeros(1, 1))
    assert (logits[..., :2] == 0).all() and torch.isinf(logits[..., 2:]).all()


def test_kv_buffer_holds_every_slot_at_full_length():
    config = types.SimpleNamespace(kv_channels=None, hidden_size=64, num_attention_heads=4,
                                   num_query_groups=2, num_layers=3, params_dtype=torch.bfloat16)
    gb = me.kv_buffer_gb(config, num_slots=5, max_len=300, tp=2)
    blocks = 5 * 2 + 1  # 300 tokens take 2 blocks of 256, plus megatron's dummy block
    block_bytes = 2 * 3 * 256 * 1 * 16 * 2  # K and V, layers, tokens, heads per rank, dim, bytes
    assert gb * 1024 ** 3 == blocks * block_bytes


def test_results_assemble_into_the_rollout_callers_read():
    results = [Result(0, [5, 9], [-0.5, -1.5], "f", "eos"),
               Result(1, [4, 4, 4], [-1.0, -2.0, -3.0], "eee", "length")]
    roll = to_rollout([[1, 2, 3], [7]], results, Tok, torch.device("cpu"))
    assert roll.tokens.tolist() == [[1, 2, 3, 5, 9], [7, 4, 4, 4, 0]]
    assert roll.response_mask.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    assert roll.logprobs.tolist() == [[0, 0, 0, -0.5, -1.5], [0, -1, -2, -3, 0]]
    assert roll.prompt_lens.tolist() == [3, 1] and roll.response_lens.tolist() == [2, 3]
    assert roll.texts == ["f", "eee"] and roll.finish_reasons == ["eos", "length"]


def test_rl_recomputes_old_logprobs_with_the_training_forward_for_megatron(tmp_path):
    """rl.engine=megatron's rollouts come from other kernels: prepare() replaces their
    log-probs with the training forward's (here: corrupted ones come back as the rollout's)."""
    import torch.distributed as dist

    from megatron_ext import compat
    from megatron_ext.models.init import initialize_weights
    from megatron_ext.rl.recipe import RLRecipe
    from parallel import topology
    compat.setup()
    from megatron.core import parallel_state as ps
    cfg = compose_config(["stage=rl", "logging=none", "rl.group_size=2", "rl.prompts_per_step=2",
                          "rl.max_new_tokens=5", "rl.band_low=0", "rl.band_high=1",
                          "data.num_samples=16", "train.eval_samples=4",
                          "model.init_method_std=0.2", f"rl.init_checkpoint={tmp_path}",
                          f"run.dir={tmp_path}"])
    topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
    try:
        recipe = RLRecipe(cfg, topo, lambda line: None)
        initialize_weights(recipe.policy.chunks, cfg.seed, recipe.vocab_size, topo)
        assert recipe.recompute_old_logp is False  # auto: ours on this machine
        groups = recipe.collect(1)[0].groups
        rollout = recipe.prepare(groups)[0]["old_logp"].clone()
        for g in groups:
            g.logprobs.copy_(torch.where(g.response_mask > 0, torch.full_like(g.logprobs, -7.0),
                                         g.logprobs))
        corrupted = recipe.prepare(groups)[0]
        mask = corrupted["mask"] > 0
        assert mask.any() and bool((corrupted["old_logp"][mask] == -7.0).all())
        recipe.recompute_old_logp = True
        fixed = recipe.prepare(groups)[0]
        assert torch.allclose(fixed["old_logp"], rollout, atol=1e-5)
        assert bool((fixed["old_logp"][~mask] == 0).all())
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
