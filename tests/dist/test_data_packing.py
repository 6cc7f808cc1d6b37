"""Packing without contamination (data.isolate_documents=true, the default): packed examples
attend only within themselves with positions restarting at 0, so the loss of packed rows equals
that of each example in its own padded row (fp32, to 1e-5), on one process, at TP2 and at
TP2xCP2 (ring attention over zigzag shards of packed rows); so do the training loss (the fused
linear cross-entropy) and the gradients of one update. Packing without isolation differs (the
check can fail)."""
import json

import pytest

from tests.dist._spawn import run_distributed

BASE = ["logging=none", "model=tiny", "model.attention_backend=sdpa", "train.seq_len=64",
        "train.micro_batch_size=2", "train.global_batch_size=2", "train.steps=10",
        "train.warmup_steps=5",
        "train.eval_samples=4", "stage=pretrain", "data=jsonl"]
TEXTS = ["one two three", "four", "five six seven eight nine", "ten eleven", "twelve",
         "thirteen fourteen fifteen sixteen", "a b c d e f g", "xyz"]


def _worker(rank, world_size, cp, path, out):
    import torch
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.data.dataset import build_rows
    from megatron_ext.models.reshard import gather_full_state
    from megatron_ext.sft.recipe import SFTRecipe, LM_METRICS, lm_loss
    from megatron_ext.training.heldout import heldout_lm
    from parallel import topology

    compat.setup()
    overrides = BASE + [f"parallel.tp={world_size // cp}", f"parallel.cp={cp}", f"data.path={path}"]
    cfgs = {name: compose_config(overrides + extra) for name, extra in (
        ("alone", ["data.pack=false"]),
        ("isolated", ["data.pack=true"]),  # isolation is the default
        ("mixed", ["data.pack=true", "data.isolate_documents=false"]))}
    topo = topology.initialize(validate(cfgs["isolated"], world_size), seed=1234)
    recipe = SFTRecipe(cfgs["isolated"], topo, log=lambda line: None)
    rows = {name: build_rows(cfg, recipe.tokenizer) for name, cfg in cfgs.items()}
    losses = {name: heldout_lm(recipe.policy, r, recipe.vocab_size)["loss"]
              for name, r in rows.items()}
    grads, train_losses = {}, {}
    for name in ("alone", "isolated"):
        r = rows[name]
        batches = [recipe.policy.place(r.batch(list(range(len(r)))))]
        seen = []
        step = recipe.policy.train_on(
            batches, lm_loss, LM_METRICS, labels=True,
            inspect_grads=lambda: seen.append(gather_full_state(recipe.policy.chunks, topo,
                                                                grads=True)))
        grads[name] = seen[0]  # (the LR of the warm-up's step 0 is 0: the weights stay)
        train_losses[name] = step.loss
    if rank == 0:  # the full gradients are gathered on rank 0
        diff = max(float((grads["alone"][k] - grads["isolated"][k]).abs().max()
                         / grads["alone"][k].abs().max().clamp_min(1e-12)) for k in grads["alone"])
        with open(out, "w") as f:
            json.dump({"losses": losses, "rows": {k: len(v) for k, v in rows.items()},
                       "train_losses": train_losses, "grad_rel_diff": diff,
                       "fused": recipe.policy.modules()[0].__class__.__name__}, f)
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()  # the world group is the launcher's to destroy


@pytest.mark.parametrize("world_size, cp", [(1, 1), (2, 1), (4, 2)],
                         ids=["one-process", "tp2", "tp2xcp2"])
def test_packed_loss_equals_examples_alone(tmp_path, world_size, cp):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "", "response": t}) + "\n" for t in TEXTS))
    out = tmp_path / "out.json"
    run_distributed(_worker, world_size, cp, str(path), str(out))
    got = json.loads(out.read_text())
    loss, rows = got["losses"], got["rows"]
    assert rows["isolated"] < rows["alone"] == len(TEXTS)  # several examples share a row
    assert abs(loss["isolated"] - loss["alone"]) <= 1e-5 * abs(loss["alone"]), loss
    assert abs(loss["mixed"] - loss["alone"]) > 1e-3, loss  # contamination shows
    train = got["train_losses"]
    assert got["fused"] == "FusedLossGPTModel"  # the training loss is the fused one
    assert abs(train["isolated"] - train["alone"]) <= 1e-5 * abs(train["alone"]), train
    assert got["grad_rel_diff"] < 1e-5, got
