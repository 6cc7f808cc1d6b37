"""The CheckpointManager on real process groups (gloo).

Two processes, TP=2: a policy and a PPO critic (two ModelParts, the critic's keys prefixed,
two optimizers with Adam state) in ONE checkpoint; a full load into fresh models restores every
tensor and the states; load(only=("model",)) restores the policy only; the policy's trunk loads
into a fresh critic (parts=, skip= its value head). The manifest the ranks hash together equals
one process's; shared verification gives every rank the same verdict and auto-resume skips a
corrupt checkpoint by name. A checkpoint saved before the optimizers' first step (RL's step-0
best) loads into stepped optimizers, and the same step from it gives the same weights.

Four processes: resuming on another TP with the default (byte) vocab, whose padded rows change
(TP1: 384, TP2 and TP4: 512): the real rows of the weights and of the Adam moments are the saved
ones, the padding rows are zero, every other tensor is equal, and training goes on (finite
losses); on the same layout the next step's loss is the uninterrupted run's to the bit. With
megatron's optimizer and with its distributed optimizer (whose fresh-optimizer load needs
compat/optimizer_state.py on torch's Adam). The cross-layout loss equality waits for padding to
leave the loss (the padded rows take part in the softmax until then)."""
import json
import math
import os

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from tests.dist._spawn import run_distributed

TINY = ["logging=none", "model=tiny", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.eval_samples=4", "data.num_samples=64"]
VOCAB = 259  # the byte tokenizer's


class _Counter:
    """A stateful: JSON-able state_dict / load_state_dict."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _fake_step(chunks, optimizer, seed):
    """One optimizer step on fixed pseudo-random gradients (the same on every rank for the
    same parameter shapes, so replicated parameters stay replicated): real Adam state."""
    gen = torch.Generator().manual_seed(seed)
    for chunk in chunks:
        for p in chunk.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=gen))
    optimizer.step()


def _policy_and_critic(cfg, topo, vocab):
    from megatron_ext.models.critic import build_critic, critic_config
    from megatron_ext.models.gpt import build_model
    from megatron_ext.training.optimizer import build_optimizer
    policy, critic = build_model(cfg, topo, vocab), build_critic(cfg, topo, vocab)
    return (policy, build_optimizer(cfg, policy), critic,
            build_optimizer(critic_config(cfg), critic))


def _manager(root, topo, cfg, policy, popt, critic, copt, counter, logs):
    from megatron_ext.training.checkpoint import (CheckpointManager, ModelPart, OptimizerPart,
                                                  model_shape)
    pm, cm = ModelPart(policy), ModelPart(critic, prefix="critic.")
    return CheckpointManager(
        root, topo, keep=2, states={"counter": counter}, log=logs.append,
        sharded={"model": pm, "optimizer": OptimizerPart(popt, pm), "critic": cm,
                 "critic_optimizer": OptimizerPart(copt, cm)},
        shape=model_shape(cfg.model, VOCAB, policy))


def _policy_critic_worker(rank, world_size, out):
    import shutil

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron_ext.models.critic import HEAD
    from megatron_ext.models.reshard import gather_full_state
    from megatron_ext.training.checkpoint import CheckpointError, ModelPart, integrity

    cfg = compose_config(TINY + ["parallel.tp=2", "rl=ppo"])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    root = os.path.join(out, "run", "checkpoints")
    logs, res = [], {}

    policy, popt, critic, copt = _policy_and_critic(cfg, topo, VOCAB)
    mgr = _manager(root, topo, cfg, policy, popt, critic, copt, _Counter(7), logs)
    best = mgr.save(0, tag="best")  # before the optimizers' first step: no Adam state yet
    _fake_step(policy, popt, 1)
    _fake_step(critic, copt, 2)
    path = mgr.save(3)
    saved = {"policy": gather_full_state(policy, topo), "critic": gather_full_state(critic, topo)}

    # a full load into fresh models and optimizers (another seed's weights), saved again
    torch.manual_seed(99)
    policy2, popt2, critic2, copt2 = _policy_and_critic(cfg, topo, VOCAB)
    counter = _Counter(0)
    mgr2 = _manager(os.path.join(out, "run2", "checkpoints"), topo, cfg, policy2, popt2,
                    critic2, copt2, counter, logs)
    state = mgr2.load(path)
    res["counter"], res["state_step"] = counter.value, state["step"]
    got = {"policy": gather_full_state(policy2, topo), "critic": gather_full_state(critic2, topo)}
    mgr2.save(3)

    # only the policy's weights, into a fresh policy; the states stay as they are
    policy3, popt3, critic3, copt3 = _policy_and_critic(cfg, topo, VOCAB)
    counter.value = -1
    mgr3 = _manager(root, topo, cfg, policy3, popt3, critic3, copt3, counter, logs)
    mgr3.load(path, only=("model",))
    res["counter_after_partial"] = counter.value
    only_model = gather_full_state(policy3, topo)
    fresh_critic = gather_full_state(critic3, topo)
    # the policy's trunk into the fresh critic, its value head left as it is
    mgr3.load(path, only=("model",),
              parts={"model": ModelPart(critic3, skip=lambda k: k.startswith(HEAD))})
    trunk = gather_full_state(critic3, topo)

    # integrity: the ranks' manifest is the one a single process writes
    copy = os.path.join(out, "copy")
    corrupt = os.path.join(root, "step_00000005")  # newer than the good one
    if rank == 0:
        shutil.copytree(path, copy)
        integrity.write_manifest(copy)
        shutil.copytree(path, corrupt)
        victim = sorted(f for f in os.listdir(corrupt) if f.startswith("__1_"))[0]
        with open(os.path.join(corrupt, victim), "r+b") as f:
            f.seek(64)
            f.write(b"\x00\xff\x00\xff")
    torch.distributed.barrier()
    logs.clear()
    res["verdict_corrupt"] = mgr.verify(corrupt)
    res["verdict_good"] = mgr.verify(path)
    res["auto"] = mgr.resume_path("auto")
    res["auto_logs"] = list(logs)
    try:
        mgr.resume_path(corrupt)
        res["explicit"] = "no error"
    except CheckpointError as err:
        res["explicit"] = str(err)
    # back to the step-0 checkpoint: the same step again gives the same weights
    mgr.load(best)
    _fake_step(policy, popt, 1)
    _fake_step(critic, copt, 2)
    again = {"policy": gather_full_state(policy, topo), "critic": gather_full_state(critic, topo)}
    if rank == 0:
        torch.save({"saved": saved, "got": got, "only_model": only_model, "again": again,
                    "fresh_critic": fresh_critic, "trunk": trunk},
                   os.path.join(out, "states.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


def _full(path, tmp):
    """Every tensor of a checkpoint at full (global) shape, by torch's DCP converter."""
    dcp_to_torch_save(path, tmp)
    return {k: v for k, v in torch.load(tmp, weights_only=True).items()
            if isinstance(v, torch.Tensor)}


def _equal(a, b):
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


@pytest.fixture(scope="module")
def policy_critic(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ckpt_manager"))
    run_distributed(_policy_critic_worker, 2, out)
    return out


def test_policy_and_critic_share_one_checkpoint_and_load_back(policy_critic, tmp_path):
    out = policy_critic
    root = os.path.join(out, "run", "checkpoints")
    path = os.path.join(root, "step_00000003")
    assert sorted(os.listdir(root)) == ["best_00000000", "latest", "step_00000003",
                                        "step_00000005"]
    tensors = _full(path, str(tmp_path / "a.pt"))
    critic_keys = [k for k in tensors if k.startswith("critic.")]
    policy_keys = {k for k in tensors if not k.startswith(("critic.", "optimizer."))}
    assert {k[len("critic."):] for k in critic_keys} == policy_keys  # the same model, prefixed
    assert {"embedding.word_embeddings.weight", "output_layer.weight"} <= policy_keys
    assert tensors["critic.output_layer.weight"].shape == (1, 64)  # the value head
    assert any(k.startswith("optimizer.state.exp_avg.critic.") for k in tensors)
    assert any(k.startswith("optimizer.state.exp_avg.decoder.") for k in tensors)
    assert tensors["critic.output_layer.weight"].abs().sum() > 0  # the critic's step moved it
    # a full load and a save give the same tensors, Adam moments of both models included
    again = _full(os.path.join(out, "run2", "checkpoints", "step_00000003"), str(tmp_path / "b.pt"))
    assert _equal(tensors, again) == []

    s = torch.load(os.path.join(out, "states.pt"), weights_only=True)
    for which in ("policy", "critic"):
        assert _equal(s["got"][which], s["saved"][which]) == []
        assert _equal(s["again"][which], s["saved"][which]) == []  # restored step 0 = fresh
    assert _equal(s["only_model"], s["saved"]["policy"]) == []
    trunk_keys = [k for k in s["trunk"] if not k.startswith("output_layer.")]
    assert trunk_keys and all(torch.equal(s["trunk"][k], s["saved"]["policy"][k])
                              for k in trunk_keys)
    assert torch.equal(s["trunk"]["output_layer.weight"], s["fresh_critic"]["output_layer.weight"])
    assert any(not torch.equal(s["fresh_critic"][k], s["trunk"][k]) for k in trunk_keys)

    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank got the same verdicts
    r = ranks[0]
    assert r["counter"] == 7 and r["state_step"] == 3 and r["counter_after_partial"] == -1
    assert r["verdict_good"] is None
    assert r["verdict_corrupt"].startswith("file __1_") and "fails its sha256 check" in r["verdict_corrupt"]
    assert r["auto"] == path
    corrupt = os.path.join(root, "step_00000005")
    assert r["auto_logs"] == [f"checkpoint {corrupt} is unusable: {r['verdict_corrupt']}; "
                              "trying the previous one"]
    assert r["explicit"] == (f"train.resume={corrupt!r} is unusable: {r['verdict_corrupt']}; give "
                             "a complete checkpoint as train.resume=PATH, or train.resume=none to "
                             "start over")


def test_ranks_hash_the_manifest_one_process_would_write(policy_critic):
    out = policy_critic
    shared = json.load(open(os.path.join(out, "run", "checkpoints", "step_00000003",
                                         "manifest.json")))
    single = json.load(open(os.path.join(out, "copy", "manifest.json")))
    assert shared == single
    names = set(shared["files"])
    assert {"__0_0.distcp", "__1_0.distcp", "common.pt", ".metadata", "train_state.json",
            "rank_state/00000.pt", "rank_state/00001.pt"} <= names


# -- padded vocab across TP -------------------------------------------------------------------
LAYOUT_BASE = TINY + ["model.num_query_groups=4", "train.steps=6"]


OPTIMIZERS = {"adam": [], "distributed-adam": ["parallel.use_distributed_optimizer=true"]}


def _reshard_worker(rank, world_size, root):
    for name, overrides in OPTIMIZERS.items():
        out = os.path.join(root, name)
        os.makedirs(out, exist_ok=True)
        _reshard_layouts(rank, world_size, out, overrides)


def _reshard_layouts(rank, world_size, out, optimizer_overrides):
    from megatron.core import parallel_state as ps

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron_ext.models.reshard import gather_full_state
    from megatron_ext.train import build_loop

    class Run:
        """The training loop driven one step at a time."""

        def __init__(self, loop):
            self.loop, self.checkpoints = loop, loop.checkpoints
            self.model = loop.recipe.policy.chunks

        def train_step(self):
            self.loop.step += 1
            return self.loop.recipe.train_step(self.loop.step)

        def save(self):
            return self.loop.save()

    def trainer(name, tp):
        cfg = compose_config(LAYOUT_BASE + optimizer_overrides +
                             [f"parallel.tp={tp}", f"run.dir={os.path.join(out, name)}"])
        topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)
        return Run(build_loop(cfg, topo, cfg.run.dir)), topo

    res = {"losses": {}, "logs": []}
    t, topo = trainer("tp1", 1)
    t.train_step()
    t.train_step()
    res["padded"] = {"tp1": t.model[0].module.vocab_size}
    res["tp1_saved"] = source = t.save()
    tp1_weights = gather_full_state(t.model, topo)
    res["losses"]["tp1"] = t.train_step()["loss"]  # the uninterrupted next step
    if rank == 0:
        torch.save(tp1_weights, os.path.join(out, "tp1_saved.pt"))
    ps.destroy_model_parallel()

    # the same layout (exact), then TP2 from TP1's step 2, then TP4 from TP2's step 3
    for name, tp in (("tp1_resumed", 1), ("tp2", 2), ("tp4", 4)):
        t, topo = trainer(name, tp)
        t.checkpoints.log = res["logs"].append
        t.checkpoints.load(source)
        res["padded"][name] = t.model[0].module.vocab_size
        loaded = gather_full_state(t.model, topo)
        res[f"{name}_source"], res[f"{name}_resaved"] = source, t.save()  # as loaded
        res["losses"][name] = t.train_step()["loss"]
        if name != "tp1_resumed":
            source = t.save()  # step 3: what the next layout loads
        if rank == 0:
            torch.save(loaded, os.path.join(out, f"{name}_loaded.pt"))
        ps.destroy_model_parallel()
    if rank == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(res, f)


def _compare_rows(old, new):
    """Tensors whose row count changed (the padded vocab): real rows equal, padding rows zero;
    every other tensor equal. Returns the keys of the first kind."""
    assert old.keys() == new.keys()
    repadded = []
    for k in old:
        if old[k].shape == new[k].shape:
            assert torch.equal(new[k], old[k]), k
        else:
            assert new[k].shape[1:] == old[k].shape[1:], k
            repadded.append(k)
            assert torch.equal(new[k][:VOCAB], old[k][:VOCAB]), k
            assert not new[k][VOCAB:].any(), k
    return repadded


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("reshard"))
    run_distributed(_reshard_worker, 4, root)
    return root


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_resume_on_another_tp_drops_or_adds_vocab_padding(resharded, tmp_path, optimizer):
    out = os.path.join(resharded, optimizer)
    res = json.load(open(os.path.join(out, "result.json")))
    assert res["padded"] == {"tp1": 384, "tp1_resumed": 384, "tp2": 512, "tp4": 512}
    assert any("tp 1 -> 2" in l and "padded vocab 384 -> 512 rows" in l for l in res["logs"])
    # on the same layout the next step is the uninterrupted run's, to the bit
    assert res["losses"]["tp1_resumed"] == res["losses"]["tp1"]
    for name in ("tp1_resumed", "tp2", "tp4"):
        before = _full(res[f"{name}_source"], str(tmp_path / f"{name}_before.pt"))
        after = _full(res[f"{name}_resaved"], str(tmp_path / f"{name}_after.pt"))
        repadded = _compare_rows(before, after)
        if name == "tp2":  # weights and both Adam moments of the embedding and output layer
            kinds = {k.split(".")[2] if k.startswith("optimizer.") else k for k in repadded}
            assert {"embedding.word_embeddings.weight", "output_layer.weight", "exp_avg",
                    "exp_avg_sq"} <= kinds, repadded
        else:  # the same layout; 512 rows at TP2 and TP4: nothing to repad
            assert repadded == []
        assert math.isfinite(res["losses"][name])
    # the gathered weights the TP2 model holds equal the TP1 ones on the real rows
    tp1 = torch.load(os.path.join(out, "tp1_saved.pt"), weights_only=True)
    loaded = torch.load(os.path.join(out, "tp2_loaded.pt"), weights_only=True)
    assert loaded.keys() == tp1.keys()
    for k, v in loaded.items():
        if v.shape == tp1[k].shape:
            assert torch.equal(v, tp1[k]), k
        else:  # 384 -> 512 rows
            assert torch.equal(v[:VOCAB], tp1[k][:VOCAB]) and not v[VOCAB:].any(), k
