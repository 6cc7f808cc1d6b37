"""The NaN/Inf guard on the real trainer (one gloo process): a step whose loss or gradient norm
is not finite leaves the weights as they were and is counted; train.max_bad_steps of them in a
row save a `bad-state_<step>` checkpoint and stop with NonFiniteLossError naming the step."""
import json
import os

from tests.dist._spawn import run_distributed

BASE = ["logging=none", "model=tiny", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.steps=10", "train.max_bad_steps=3",
        "train.eval_samples=4", "data.num_samples=128", "train.lr=1e-2", "train.warmup_steps=1"]
NAN_LOSS = {2, 6, 7, 8}  # the step's reduced loss is NaN (its gradients are finite)
NAN_GRAD = {3}  # the loss is finite, one gradient entry is NaN: the grad norm catches it
STOP = 8  # 6, 7, 8: three in a row


def _worker(rank, world_size, run_dir, out):
    import torch
    from megatron.core import parallel_state as ps
    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron_ext.training import checkpoint
    from megatron_ext.sft.recipe import LM_METRICS
    from megatron_ext.train import build_loop
    from megatron_ext.training.loop import NonFiniteLossError

    cfg = compose_config(BASE + [f"run.dir={run_dir}"])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    os.makedirs(run_dir, exist_ok=True)
    loop = build_loop(cfg, topo, run_dir)
    policy = loop.recipe.policy
    params = [p for chunk in policy.chunks for p in chunk.parameters()]
    weights = []  # weights[k]: the weights after step k
    real_reduce = policy.reduce

    def reduce(outputs, specs):
        """After backward, before the guarded step: the step's metrics, spoilt on cue."""
        values = real_reduce(outputs, specs)
        if specs is not LM_METRICS:  # an eval
            return values
        weights.append([p.detach().clone() for p in params])
        if loop.step in NAN_GRAD:
            params[0].main_grad.view(-1)[0] = float("nan")
        if loop.step in NAN_LOSS:
            values["loss"] = float("nan")
        return values

    policy.reduce = reduce
    result = {}
    try:
        loop.run()
        result["error"] = None
    except NonFiniteLossError as err:
        result["error"] = str(err)
    weights.append([p.detach().clone() for p in params])
    result["changed"] = [any(not torch.equal(a, b) for a, b in zip(weights[k - 1], weights[k]))
                         for k in range(1, len(weights))]  # [k-1]: did step k move a weight
    result["finite_after"] = all(torch.isfinite(p).all().item() for p in params)
    root = os.path.join(run_dir, "checkpoints")
    bad = os.path.join(root, f"bad-state_{STOP:08d}")
    result["bad_state"] = bad if os.path.isdir(bad) else None
    result["bad_state_problem"] = checkpoint.verify(bad) if os.path.isdir(bad) else None
    result["listing"] = sorted(os.listdir(root)) if os.path.isdir(root) else []
    result["auto_resume_picks"] = loop.checkpoints.resume_path("auto")
    if result["bad_state"]:
        state = checkpoint.read_train_state(bad)
        result["bad_state_train_state"] = {"step": state["step"],
                                           "skipped_steps": state["loop"]["skipped_steps"]}
    ps.destroy_model_parallel()
    with open(out, "w") as f:
        json.dump(result, f)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "result.json")
    run_distributed(_worker, 1, run_dir, out)
    result = json.load(open(out))
    bad_steps = NAN_LOSS | NAN_GRAD

    # weights move on every good step and on no bad one
    assert result["changed"] == [k not in bad_steps for k in range(1, STOP + 1)]
    assert result["finite_after"]

    # counted: skipped_steps in every record, the loss of a NaN step recorded as null
    records = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r for r in records if r.get("split") != "eval"]
    assert [r["step"] for r in train] == list(range(1, STOP + 1))
    assert [r["skipped_steps"] for r in train] == [
        sum(1 for b in bad_steps if b <= k) for k in range(1, STOP + 1)]  # 0 1 2 2 2 3 4 5
    assert [r["loss"] is None for r in train] == [k in NAN_LOSS for k in range(1, STOP + 1)]
    assert train[2]["loss"] is not None and train[2]["grad_norm"] is None  # step 3: NaN grad

    # three in a row: a bad-state checkpoint beside the regular ones, and an error naming it
    assert result["bad_state"] is not None, result["listing"]
    assert result["bad_state_problem"] is None  # complete and verified
    assert result["bad_state_train_state"] == {"step": STOP, "skipped_steps": len(bad_steps)}
    assert result["auto_resume_picks"] is None  # auto-resume never picks a bad state
    assert "latest" not in result["listing"]
    assert result["error"] is not None
    assert (f"loss or grad norm was NaN/Inf for 3 steps in a row, up to step {STOP}; the state "
            f"is saved in {result['bad_state']} for inspection") in result["error"]
    assert "Lower train.lr" in result["error"]
