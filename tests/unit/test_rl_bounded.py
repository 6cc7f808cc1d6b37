"""Bounded memory in RL and generation, on one process: rollouts and held-out eval through at
most `rl.rollout_batch` sequence slots give what one batch gives (greedy), and the reference's
weights streamed from the host (`rl.offload_reference`) give bit-identical log-probs while the
device holds one block of them at a time."""
import dataclasses

import pytest
import torch
import torch.distributed as dist

from megatron_ext.config.fields import ConfigError, check_fields
from megatron_ext.config.rl import RLConfig, check_rl
from megatron_ext.config.schema import GenerateConfig
from megatron_ext.models.offload import HostWeights, blocks, offload_reference
from megatron_ext.models.generate import SamplingParams, generate


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """An RL recipe (tiny model, KL on, so with a reference model) in a one-process world."""
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.rl.recipe import RLRecipe
    from parallel import topology

    compat.setup()
    from megatron.core import parallel_state as ps

    run = tmp_path_factory.mktemp("rl_bounded")
    cfg = compose_config(["stage=rl", "logging=none", "rl.kl_coef=0.05", "rl.group_size=4",
                          "rl.prompts_per_step=3", "rl.max_new_tokens=6", "rl.band_low=0",
                          "rl.band_high=1", "data.num_samples=64", "train.eval_samples=7",
                          "train.micro_batch_size=4", "model.init_method_std=0.2",
                          f"rl.init_checkpoint={run}", f"run.dir={run}"])
    topo = topology.initialize(validate(cfg, 1), seed=cfg.seed)
    logged = []
    recipe = RLRecipe(cfg, topo, logged.append)  # built for a checkpoint load: not drawn
    from megatron_ext.models.init import initialize_weights
    for unit in (recipe.policy, recipe.reference):
        initialize_weights(unit.chunks, cfg.seed, recipe.vocab_size, topo)
    yield recipe, logged
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def test_bounds_are_config_fields_with_clear_errors():
    for node, prefix, change, match in [
            (RLConfig(), "rl.", {"rollout_batch": 0}, "rl.rollout_batch=0 must be >= 1"),
            (GenerateConfig(), "generate.", {"max_batch": 0}, "generate.max_batch=0 must be >= 1")]:
        check_fields(node, prefix)
        with pytest.raises(ConfigError, match=match):
            check_fields(dataclasses.replace(node, **change), prefix)
    with pytest.raises(ConfigError, match="rl.offload_reference=true, but rl.kl_coef=0"):
        check_rl(RLConfig(offload_reference=True))
    check_rl(RLConfig(offload_reference=True, kl_coef=0.1))


def test_generation_in_slots_equals_one_batch(recipe):
    recipe, _ = recipe
    model, tok = recipe.policy.chunks, recipe.tokenizer
    prompts = recipe.pool.prompts[:7]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    kw = dict(vocab_size=recipe.vocab_size, generator=None)
    whole = generate(model, prompts, tok, greedy, num_slots=7, **kw)
    for slots in (1, 3):
        part = generate(model, prompts, tok, greedy, num_slots=slots, **kw)
        assert part.texts == whole.texts and part.finish_reasons == whole.finish_reasons
        assert torch.equal(part.tokens, whole.tokens)
        assert torch.equal(part.response_lens, whole.response_lens)
        assert torch.allclose(part.logprobs, whole.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="num_slots=0 and check_every=4 must be >= 1"):
        generate(model, prompts, tok, greedy, num_slots=0, **kw)

    from megatron_ext.rl.evaluation import heldout_eval
    scores = {slots: heldout_eval(
        model, recipe.heldout, dataclasses.replace(recipe.rl, rollout_batch=slots, max_new_tokens=6),
        tokenizer=tok, vocab_size=recipe.vocab_size, topo=recipe.topo, seed=0,
        device=recipe.policy.device, contribute=True) for slots in (2, len(recipe.heldout))}
    assert scores[2] == scores[len(recipe.heldout)]
    assert scores[2]["samples"] == len(recipe.heldout)


def test_reference_streamed_from_host_gives_identical_logprobs(recipe):
    recipe, logged = recipe
    ref = recipe.reference
    groups = recipe.collect(1)[0].groups
    want = recipe.prepare(groups)[0]["ref_logp"]
    weights = {k: v.clone() for k, v in ref.chunks[0].state_dict().items()
               if isinstance(v, torch.Tensor)}
    parts = list(blocks(ref.chunks[0]))
    assert len(parts) == recipe.cfg.model.num_layers + 3  # embedding, layers, norm, output

    host = HostWeights(ref.chunks, ref.device)
    assert all(p.numel() == 0 for b in parts for p in b.parameters())  # nothing left resident
    seen = []
    watch = [b.register_forward_pre_hook(lambda m, a: seen.append(host.resident)) for b in parts]
    got = recipe.prepare(groups)[0]["ref_logp"]
    for handle in watch:
        handle.remove()
    assert torch.equal(got, want)
    # every block came to the device for the forward, one at a time, and left again
    assert len(seen) >= len(parts) and set(seen) == {1} and host.resident == 0
    assert all(p.numel() == 0 for b in parts for p in b.parameters())
    host.remove()
    after = ref.chunks[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())

    # the recipe's switch, after the starting weights are loaded: on the CPU it says once that
    # there is nothing to move and moves nothing
    recipe._load_start = lambda resumed, checkpoints: None
    recipe.rl.offload_reference = True
    recipe.start(resumed=False, checkpoints=None)
    if ref.device.type == "cpu":
        assert recipe.reference_host is None
        assert sum("rl.offload_reference=true" in line for line in logged) == 1
        assert torch.equal(recipe.prepare(groups)[0]["ref_logp"], want)
    else:
        assert isinstance(recipe.reference_host, HostWeights)
        assert torch.equal(recipe.prepare(groups)[0]["ref_logp"], want)
    assert offload_reference(ref.chunks, torch.device("cpu"), logged.append) is None
