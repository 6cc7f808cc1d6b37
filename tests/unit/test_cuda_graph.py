"""models/decode_graph.py on a CPU, one process: the fixed-shape decode passes (rows and keys
padded to buckets, static input buffers) give the engine's tokens, samples and log-probs;
with graph semantics (tests/cuda_graph_fake.py) as well; one capture per bucket, not per
pass; padding never writes a live slot's cache; release() frees everything; the config and
argument errors. TP=2, PP=2 and PP=2 x VPP=2: tests/dist/test_cuda_graph_dist.py."""
from __future__ import annotations

import pytest
import torch

from megatron_ext.config.engine import resolve_cuda_graphs
from megatron_ext.config.fields import ConfigError
from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.models.decode_graph import DecodeGraphs, key_bucket, row_bucket, unsupported
from megatron_ext.models.generate import Engine, SamplingParams, generate
from tests import cuda_graph_fake

from .test_decode import build, full_logits, world  # noqa: F401 (world: a fixture)

TOK = ByteTokenizer()
VOCAB = 384
TOL = 1e-5
# prompts of 2 to 41 tokens, 7 requests through 5 slots (refills change the row count); 100
# new tokens carry the longest row past one key block (128)
LENS = (3, 17, 41, 9, 5, 2, 30)
MAX_NEW = 100


def test_buckets():
    assert [row_bucket(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert [row_bucket(n, 8) for n in (5, 8)] == [8, 8]
    assert [key_bucket(k, 300, 128) for k in (1, 128, 129, 256, 257, 300)] == [
        128, 128, 256, 256, 300, 300]
    with pytest.raises(ValueError, match="7 rows must have 1 to 6"):
        row_bucket(7, 6)
    with pytest.raises(ValueError, match=r"kv_len=301 must be in \[1, max_len=300\]"):
        key_bucket(301, 300, 128)


@pytest.fixture(scope="module")
def model(world):  # noqa: F811
    chunks, _ = build(world, ["model.init_method_std=0.2"], VOCAB)
    return chunks


def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENS]


def run(chunks, params, **options):
    """(results, engine) of the 7 prompts through 5 slots; the engine released."""
    engine = Engine(chunks, TOK, params, vocab_size=TOK.vocab_size, num_slots=5,
                    max_len=max(LENS) + MAX_NEW, seed=7, **options)
    calls = []
    if engine.graphs is not None:  # every decode pass's bucket
        inner = engine.graphs.__call__

        def counting(v, x, slots, positions, kv_len, group):
            rows = row_bucket(len(slots), 5)
            calls.append((v, rows, group if rows == 5 else None,
                          key_bucket(kv_len, engine.max_len, engine.graphs.block)))
            return inner(v, x, slots, positions, kv_len, group)
        engine.graphs = _Calls(engine.graphs, counting)
    for p in prompts():
        engine.add_request(p)
    results = engine.drain()
    engine.calls = calls
    return results, engine


class _Calls:
    """The engine's DecodeGraphs with its calls recorded."""

    def __init__(self, graphs, call):
        self.inner, self.call = graphs, call

    def __call__(self, *args):
        return self.call(*args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


PARAMS = [SamplingParams(max_new_tokens=MAX_NEW, temperature=0),
          SamplingParams(max_new_tokens=MAX_NEW, temperature=0.9, top_p=0.9)]


def assert_same(got, want, where):
    assert [r.tokens for r in got] == [r.tokens for r in want], where
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want], where
    diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g.logprobs, w.logprobs))
    assert diff <= TOL, f"{where}: log-probs differ by {diff:.3g}"


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "top_p"])
def test_fixed_shapes_and_graphs_give_the_engines_rollouts(model, monkeypatch, params):
    want, dynamic = run(model, params)
    dynamic.release()
    assert dynamic.graphs is None
    assert sum(len(r.tokens) for r in want) > 4 * MAX_NEW  # long rows: two key buckets
    # eager (the CPU's): exact key lengths, static rows by bucket
    fixed, engine = run(model, params, fixed_shape=True)
    assert_same(fixed, want, "fixed shapes")
    assert engine.graphs.block == 1 and len({k for *_, k in engine.calls}) > 90
    assert sorted(engine.graphs.inputs, key=str) == sorted({k[:3] for k in engine.calls}, key=str)
    engine.release()
    assert not engine.graphs.runs and not engine.graphs.inputs

    # graphs (the GPU's): key buckets of 128, one capture per bucket, replayed every pass
    graphs = cuda_graph_fake.install(monkeypatch.setattr)
    replayed, engine = run(model, params, cuda_graphs=True)
    assert_same(replayed, want, "graphs")
    buckets = set(engine.calls)
    assert {k for *_, k in buckets} == {128, max(LENS) + MAX_NEW}
    # refills and finished rows change the rows: the whole group (a view) and compact buckets
    assert {n for _, n, _, _ in buckets} >= {5, 4} and {g for *_, g, _ in buckets} == {0, None}
    assert sorted(engine.graphs.runs, key=str) == sorted(buckets, key=str)
    assert len(graphs) == engine.graphs.captures == len(buckets) < len(engine.calls) // 10
    assert sum(g.replays for g in graphs) == len(engine.calls)
    assert sorted(engine.graphs.inputs, key=str) == sorted({k[:3] for k in buckets}, key=str)
    engine.release()
    assert all(g.released for g in graphs) and not engine.graphs.graphs
    with pytest.raises(RuntimeError, match="released"):
        engine.graphs(0, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                      torch.zeros(1, 1, dtype=torch.long), 1, 0)


def test_logprobs_equal_the_training_forward(model):
    """The fixed-shape rollout's log-probs against one teacher-forced forward per row."""
    results, engine = run(model, PARAMS[0], fixed_shape=True)
    engine.release()
    forward = full_logits(model[0])
    for prompt, result in zip(prompts(), results):
        logits = forward(prompt + result.tokens)[len(prompt) - 1:-1, :TOK.vocab_size]
        want = torch.log_softmax(logits, dim=-1).gather(
            1, torch.tensor(result.tokens)[:, None])[:, 0]
        diff = (want - torch.tensor(result.logprobs)).abs().max().item()
        assert diff <= 2e-5, diff  # KV-cached vs full forward (tests/dist/test_rl_rollout.py)


def test_padding_rows_never_touch_a_live_slot(model):
    """The same decode passes through DecodeGraphs and straight through the decoder, on two
    caches: equal logits and equal caches but for the scratch column. A padding row that kept
    the slot its row held in a larger earlier pass would overwrite that slot's position."""
    from megatron_ext.models.decode import ChunkDecoder, SlotCache

    caches = [SlotCache(model, 6, 40) for _ in range(2)]
    decoders = [ChunkDecoder(model, cache) for cache in caches]
    graphs = DecodeGraphs(decoders[0], groups=[range(6)], hidden=model[0].config.hidden_size,
                          dtype=torch.float32, graphs=False, key_block=16)
    ids = torch.randint(0, 256, (6, 10), generator=torch.Generator().manual_seed(1))
    for decoder in decoders:
        decoder(0, ids, torch.arange(6), torch.arange(10).expand(6, -1), torch.full((6,), 10),
                10)
    passes = [([0, 1, 2, 3, 4], 10),  # bucket 6, the whole group: slot 5 is padding
              ([1, 2, 3], 11), ([0, 2, 4], 11),  # bucket 4, row 3 padding
              ([5, 4, 3, 2], 11),  # bucket 4 full: row 3 holds slot 2 at position 11
              ([0], 11), ([5], 10),  # bucket 1
              ([4, 1, 0], 12),  # bucket 4: row 3 is padding again
              ([3, 0, 5, 1, 4, 2], 12)]  # the whole group again, rows out of slot order
    for slots, position in passes:
        n = len(slots)
        args = (torch.full((n, 1), 5), torch.tensor(slots), torch.full((n, 1), position))
        got = graphs(0, *args, position + 1, 0)
        want = decoders[1](0, *args, torch.ones(n, dtype=torch.long), position + 1)
        assert got.shape == want.shape == (n, VOCAB)
        assert (got - want).abs().max().item() <= TOL, (slots, position)
    assert graphs.captures == 3
    assert sorted(graphs.inputs, key=str) == [(0, 1, None), (0, 4, None), (0, 6, 0)]
    live = [cache.kv[:, :, :40] for cache in caches]  # column 40 is the scratch
    assert (live[0] - live[1]).abs().max().item() <= TOL, "padding wrote into a live slot"
    assert not torch.equal(caches[0].kv[:, 0, 40], caches[1].kv[:, 0, 40])  # it went here
    graphs.release()
    for cache in caches:
        cache.release()


def test_a_group_that_is_noprogression_runs_compact(model):
    from megatron_ext.models.decode import ChunkDecoder, SlotCache
    from megatron_ext.models.decode_graph import progression

    assert progression([3]) == slice(3, 4, 1) and progression([1, 3, 5]) == slice(1, 7, 2)
    assert progression([]) is None and progression([0, 2, 1]) is None and progression([2, 0]) is None
    cache = SlotCache(model, 4, 12)
    decoder = ChunkDecoder(model, cache)
    ids = torch.randint(0, 256, (4, 3), generator=torch.Generator().manual_seed(2))
    decoder(0, ids, torch.arange(4), torch.arange(3).expand(4, -1), torch.full((4,), 3), 3)
    graphs = DecodeGraphs(decoder, groups=[[0, 2, 1, 3]], hidden=model[0].config.hidden_size,
                          dtype=torch.float32, graphs=False)
    args = (torch.full((4, 1), 7), torch.tensor([3, 1, 0, 2]), torch.full((4, 1), 3))
    want = decoder(0, *args, torch.ones(4, dtype=torch.long), 4)
    got = graphs(0, *args, 4, 0)
    assert list(graphs.inputs) == [(0, 4, None)]  # the whole group, compact: no view
    assert (got - want).abs().max().item() <= TOL


def test_resolution_and_errors(model, monkeypatch):
    assert resolve_cuda_graphs("auto", "k", None) is True
    assert resolve_cuda_graphs("auto", "k", "a CUDA device") is False
    assert resolve_cuda_graphs(False, "k", None) is False  # Hydra may hand a bool
    assert resolve_cuda_graphs("True", "k", None) is True
    with pytest.raises(ConfigError, match="k=true needs a CUDA device; use k=auto"):
        resolve_cuda_graphs("true", "k", "a CUDA device")
    with pytest.raises(ConfigError, match="k='maybe' must be one of auto, true, false"):
        resolve_cuda_graphs("maybe", "k", None)
    assert unsupported(model) == "the model on a CUDA device (it is on cpu)"
    handle = model[0].decoder.layers[0].mlp.register_forward_hook(lambda *args: None)
    try:
        assert unsupported(model).startswith("no forward hooks on the model (found on "
                                             "decoder.layers.0.mlp")
    finally:
        handle.remove()
    with pytest.raises(ConfigError, match="cuda_graphs=true needs the model on a CUDA device"):
        generate(model, [[1, 2]], TOK, PARAMS[0], vocab_size=TOK.vocab_size, generator=None,
                 cuda_graphs="true")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device .* use "
                                         r"cuda_graphs=false \(or auto\)"):
        Engine(model, TOK, PARAMS[0], vocab_size=TOK.vocab_size, num_slots=2, max_len=8,
               cuda_graphs=True)
    outs = [generate(model, [[1, 2], [3]], TOK, SamplingParams(max_new_tokens=5, temperature=0),
                     vocab_size=TOK.vocab_size, generator=None, cuda_graphs=choice)
            for choice in ("auto", "false")]  # auto on a CPU model: eager, no error
    assert torch.equal(outs[0].tokens, outs[1].tokens)


def test_config_rejects_cuda_graphs_on_cpu(tmp_path):
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate

    assert not torch.cuda.is_available()
    rl = ["stage=rl", f"rl.init_checkpoint={tmp_path}"]
    for overrides, key in [(["generate.cuda_graphs=true"], "generate.cuda_graphs"),
                           (rl + ["rl.cuda_graphs=true"], "rl.cuda_graphs")]:
        cfg = compose_config(["logging=none", *overrides])
        with pytest.raises(ConfigError, match=f"{key}=true needs a CUDA device .none is "
                                              f"visible.; use {key}=auto"):
            validate(cfg, 1)
        validate(cfg, 1, have_fused_norms=None)  # a launcher: the processes decide
    with pytest.raises(ConfigError, match="generate.cuda_graphs"):
        validate(compose_config(["logging=none", "generate.cuda_graphs=sometimes"]), 1)
    for value in ("auto", "false", "False"):  # False: what Hydra makes of `false` in a yaml
        validate(compose_config(["logging=none", f"generate.cuda_graphs={value}", *rl,
                                 f"rl.cuda_graphs={value}"]), 1)


def test_gpu_check_stage_dry_run(tmp_path):
    """benchmarks/gpu/graphs.py (check.sh's stage) on a CPU: fixed shapes against eager."""
    from .test_gpu_check import _piece, _rows

    run, table = _piece("graphs", tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = _rows(table, "dtype")
    assert [(r[0], r[1]) for r in rows] == [("fp32", "1"), ("fp32", "16"), ("bf16", "1"),
                                            ("bf16", "16")]
    assert all(r[5] == "yes" and r[-1] == "ok" and float(r[2]) > 0 for r in rows)
    assert all(float(r[6]) <= 1e-5 for r in rows[:2])
