"""The RL glue never lets a host tensor meet the model's: every model-side tensor here lives on
the `meta` device, where an operation that mixes in a CPU tensor raises (as mixing CPU and CUDA
tensors does on a GPU, which no CPU test can run). Covered: rows -> micro-batches, advantages
(GRPO), the policy and value objectives, the forward-only outputs, KL, GAE and token rewards;
and the sampling generator, made on the device of the model that samples."""
import torch

from megatron_ext.rl.algorithms import grpo
from megatron_ext.rl.advantages import gae
from megatron_ext.config.rl import RLConfig
from megatron_ext.rl.losses import kl_penalty
from megatron_ext.rl.objective import (PolicySettings, logprob_output, policy_objective,
                                       value_objective, value_output)
from megatron_ext.rl.rows import last_token_rewards, micro_batches

META = torch.device("meta")
N, T, V = 4, 6, 11


def _rows(device):
    mask = torch.ones(N, T, device=device)
    return {"tokens": torch.zeros(N, T, dtype=torch.long, device=device),
            "targets": torch.zeros(N, T, dtype=torch.long, device=device),
            "mask": mask, "old_logp": torch.zeros(N, T, device=device)}


def test_a_cpu_tensor_meeting_a_meta_tensor_raises():
    """The premise: meta catches what a GPU would."""
    try:
        torch.ones(2, device=META) * torch.ones(2)
    except (RuntimeError, NotImplementedError):
        return
    raise AssertionError("meta x cpu did not raise: this test file proves nothing")


def test_advantages_and_micro_batches_stay_on_the_model_device():
    rows = _rows(META)
    rewards = torch.zeros(N, device=META)
    grpo(rows, rewards, 2, torch.zeros(N, T, device=META), None, RLConfig(), None)
    assert rows["advantages"].device == META
    batches = micro_batches(rows, 2, META)
    assert all(v.device == META for b in batches for v in b.values())
    tokens = last_token_rewards(rewards, rows["mask"])
    adv, returns = gae(tokens, torch.zeros(N, T, device=META), rows["mask"], 1.0, 0.95)
    assert adv.device == META and returns.device == META
    assert kl_penalty(rows["old_logp"], torch.zeros(N, T, device=META), "k3").device == META


def test_objectives_and_outputs_stay_on_the_model_device():
    rows = _rows(META)
    rows.update(advantages=torch.zeros(N, T, device=META), ref_logp=torch.zeros(N, T, device=META),
                old_values=torch.zeros(N, T, device=META), returns=torch.zeros(N, T, device=META))
    logits = torch.zeros(N, T, V, device=META)
    settings = PolicySettings(vocab_size=V - 3, temperature=1.0, eps_low=0.2, eps_high=0.28,
                              dual_clip=3.0, agg="token-mean", entropy_coef=0.01, kl_coef=0.1,
                              kl_estimator="k3")
    loss, _, stats = policy_objective(settings, None, rows, logits)
    assert loss.device == META and all(v.device == META for v in stats.values())
    loss, _, stats = value_objective(0.2, "token-mean", rows, torch.zeros(N, T, 1, device=META))
    assert loss.device == META and all(v.device == META for v in stats.values())
    assert logprob_output(V - 3, 1.0, None, rows, logits)[2]["out"].device == META
    assert value_output(rows, torch.zeros(N, T, 1, device=META))[2]["out"].device == META


def test_the_sampling_generator_is_made_on_the_models_device(monkeypatch):
    """collect() draws prompts with a host generator and hands generate() one on `device`."""
    from megatron_ext.data.task import ArithmeticTask
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.rl import experience
    from megatron_ext.rl.filtering import PassRateHistory

    seen = []

    def fake_generate(model, prompts, tokenizer, params, *, generator, **kwargs):
        seen.append(generator.device)
        raise StopIteration  # enough: the generator is what this test is about

    monkeypatch.setattr(experience, "generate", fake_generate)
    tok = ByteTokenizer()
    pool = experience.PromptPool(ArithmeticTask(0, 1, 1, 4).take(8, "train"), tok)
    rl = RLConfig(prompts_per_step=2, group_size=2)
    try:
        experience.collect(None, pool, PassRateHistory(0.0, 1.0), rl=rl, params=None,
                           reward=None, tokenizer=tok, vocab_size=tok.vocab_size, seed=3,
                           device=torch.device("cpu"), tp_group=None, pp_group=None)
    except StopIteration:
        pass
    assert seen == [torch.device("cpu")]
