"""The memory planner on its own: CLI verdicts and JSON, the structure of its terms, errors.
(Agreement with real training steps is tests/dist/test_memory_measured.py.)"""
import json

import pytest

from megatron_ext.config.load import compose_config
from megatron_ext.memory import PlanError, plan
from megatron_ext.memory.__main__ import main
from megatron_ext.memory.buffers import chunk_buffers
from megatron_ext.memory.device import parse_size
from megatron_ext.memory.model_terms import Param
from megatron_ext.memory.schedule import in_flight

MOTIF_64K = ["model=motif_12p7b", "train.seq_len=65536", "parallel.tp=8", "parallel.cp=8",
             "parallel.pp=4", "train.micro_batch_size=1", "train.global_batch_size=16"]
GIB = 2**30


def _layers_saved(result, kind="only"):
    rank = next(r for r in result.ranks if r.kind == kind)
    return next(t.bytes for t in rank.terms if t.name.startswith("activations: transformer"))


@pytest.mark.parametrize("gpu_mem", ["80GiB", "141GiB"])
def test_cli_prints_a_verdict_and_consistent_json_for_motif_64k(capsys, gpu_mem):
    assert main(MOTIF_64K + ["--gpu-mem", gpu_mem]) == 0
    text = capsys.readouterr().out
    assert "note:" not in text  # the preset's 40 heads / 8 KV groups trains as configured
    verdicts = [line for line in text.splitlines() if line.startswith("verdict: ")]
    assert [v.split(":")[1].strip() for v in verdicts] == [
        "first pipeline stage", "middle pipeline stage", "last pipeline stage"]
    assert all(v.endswith(("FITS", "TIGHT", "DOES NOT FIT")) for v in verdicts)
    assert f"of {parse_size(gpu_mem) / GIB:.2f} GiB" in verdicts[0]

    assert main(MOTIF_64K + ["--gpu-mem", gpu_mem, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["capacity_bytes"] == parse_size(gpu_mem)
    assert [r["kind"] for r in data["ranks"]] == ["first", "middle", "last"]
    for r in data["ranks"]:
        assert r["static"] > 0 and r["activations"] > 0
        assert r["total"] == pytest.approx(r["static"] + r["activations"])
        assert r["total"] == pytest.approx(sum(r["terms"].values()))
        assert r["verdict"] in ("FITS", "TIGHT", "DOES NOT FIT")
    first, middle, last = data["ranks"]
    assert first["in_flight"] == 4 and middle["in_flight"] == 3 and last["in_flight"] == 1
    # the 12.7B-class model over tp=8 x pp=4: ~11.5e9 bf16 params, a 32nd of them per rank
    params = sum(r["terms"]["parameters"] for r in data["ranks"]) + middle["terms"]["parameters"]
    assert 11e9 < params / 2 * 8 < 12e9


def test_cli_without_device_prints_totals_only(capsys):
    assert main(["model=tiny"]) == 0
    out = capsys.readouterr().out
    assert "totals only" in out and "verdict" not in out and "total" in out


def test_recompute_policies_order_and_selective_drops_the_scores():
    base = ["model=tiny", "train.seq_len=512", "train.micro_batch_size=2",
            "train.global_batch_size=2"]
    none, sel, full = (plan(compose_config(base + [f"train.recompute={p}"]))
                       for p in ("none", "selective", "full"))
    assert full.ranks[0].activations < sel.ranks[0].activations < none.ranks[0].activations
    # selective drops per layer the fp32 softmax [b, np, s, s], the [s, s] mask and the
    # repeated K and V, and keeps instead K after RoPE and the QKV output (through V's view);
    # q is kept either way (4 layers, 4 heads, 2 groups, head dim 16, fp32)
    b, heads, groups, s, d, layers, tokens = 2, 4, 2, 512, 16, 4, 1024
    dropped = layers * (b * heads * s * s * 4 + s * s + 2 * heads * d * 4 * tokens)
    kept = layers * (groups + heads + 2 * groups) * d * 4 * tokens
    assert _layers_saved(none) - _layers_saved(sel) == pytest.approx(dropped - kept)
    # full recompute keeps one fp32 [s, b, h] input per layer
    assert _layers_saved(full) == pytest.approx(layers * tokens * 64 * 4)


def test_context_parallel_divides_token_terms_and_drops_score_matrices():
    base = ["model=small", "train.seq_len=8192", "train.micro_batch_size=1",
            "train.global_batch_size=1", "parallel.tp=2"]
    cp2, cp4 = (plan(compose_config(base + [f"parallel.cp={c}"]), attention="auto")
                for c in (2, 4))
    assert cp2.options.attention == "ring"
    ratio = _layers_saved(cp2) / _layers_saved(cp4)
    assert ratio == pytest.approx(2, rel=0.01)  # only the RoPE tables do not scale with tokens
    with pytest.raises(PlanError, match="parallel.cp=2.*ring"):
        plan(compose_config(base + ["parallel.cp=2"]), attention="local")


def test_distributed_optimizer_shards_moments_and_masters_over_dp():
    base = ["model=1b", "train.seq_len=1024", "train.micro_batch_size=1",
            "train.global_batch_size=8"]
    p = plan(compose_config(base), 8, spec="te").ranks[0].static_detail
    s = plan(compose_config(base + ["parallel.use_distributed_optimizer=true"]), 8,
             spec="te").ranks[0].static_detail
    assert p.master_params == 2 * p.params  # bf16 params, fp32 masters
    assert p.adam_moments == 4 * p.params
    assert s.adam_moments == pytest.approx(p.adam_moments / 8, rel=1e-3)
    assert s.master_params == pytest.approx(p.master_params / 8, rel=1e-3)
    assert s.grads == pytest.approx(p.grads, rel=1e-3)  # padded, not sharded


def test_fused_loss_drops_the_logits():
    base = ["model=small", "train.seq_len=2048", "train.micro_batch_size=1",
            "train.global_batch_size=1"]
    cfg = compose_config(base + ["model.fused_loss=false"])
    assert plan(cfg).options.fused_loss is False
    assert plan(compose_config(base)).options.fused_loss is True  # the model's default

    def edge(result):
        return next(t.bytes for t in result.ranks[0].terms if "logits" in t.name)

    logits = 2048 * 32768 * 4  # fp32 [s*b, v]
    assert edge(plan(cfg)) - edge(plan(cfg, fused_loss=True)) == pytest.approx(logits, rel=0.02)


def test_pipeline_in_flight_counts():
    assert [in_flight(4, r, 8, None) for r in range(4)] == [4, 3, 2, 1]
    assert [in_flight(4, r, 2, None) for r in range(4)] == [2, 2, 2, 1]
    # interleaved: 2*(pp-r-1) + (vpp-1)*pp + 1 chunk-micro-batches, capped by M*vpp
    assert [in_flight(4, r, 8, 2) for r in range(4)] == [11, 9, 7, 5]
    assert in_flight(2, 0, 1, 2) == 2


def test_buffer_layout_follows_megatron_padding():
    params = [Param("a", 100, 4), Param("b", 30, 4)]
    (plain,) = chunk_buffers(params, dp=2, distributed=False, bucket_size=None)
    assert plain.numel == 130 and plain.ranges == {"b": (0, 30), "a": (30, 130)}
    (dist,) = chunk_buffers(params, dp=2, distributed=True, bucket_size=None)
    # params start 64-aligned (b at 0, a at 64); the bucket pads to lcm(dp, 128)
    assert dist.ranges == {"b": (0, 30), "a": (64, 164)} and dist.numel == 256
    assert dist.shard("a", 2, 0) == 64 and dist.shard("a", 2, 1) == 36
    assert dist.shard("b", 2, 1) == 0


def test_errors_name_the_value_and_the_fix():
    with pytest.raises(PlanError, match="recompute_num_layers=3 does not divide the 4"):
        plan(compose_config(["model=tiny", "train.recompute=full",
                             "train.recompute_num_layers=3"]))
    with pytest.raises(ValueError, match="not divisible by parallel.tp=3"):
        plan(compose_config(["model=tiny", "parallel.tp=3"]))
    with pytest.raises(ValueError, match="'eighty' is not a number with a unit"):
        parse_size("eighty")
