"""Each initial weight is drawn once: megatron's own initialisation is off, models/init.py draws
every weight matrix exactly once in its one-process shape, and a model built for loading
(init=False: HF import, checkpoint load) draws nothing. Its TP attributes are still exactly the
ones megatron sets when it initialises, so TP grads reduce right: a TP2 step's grad norm equals
the DP2 one on the same batch. Two gloo processes, TP2 (gated MLP, QKV bias, untied output)."""
import dataclasses
import os

import pytest
import torch

from tests.dist._spawn import run_distributed
from tests.dist.parity_worker import BASE

MODEL = ["model.qkv_bias=true", "model.tie_embeddings=false"]
ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


class _Draws:
    """Records the shape of every tensor filled by Tensor.normal_ / uniform_ while active."""

    def __enter__(self):
        self.shapes, self._saved = [], {}
        for method in ("normal_", "uniform_"):
            original = self._saved[method] = getattr(torch.Tensor, method)
            setattr(torch.Tensor, method, self._wrap(original))
        return self

    def _wrap(self, original):
        def drawn(tensor, *args, **kwargs):
            self.shapes.append(tuple(tensor.shape))
            return original(tensor, *args, **kwargs)
        return drawn

    def __exit__(self, *exc):
        for method, original in self._saved.items():
            setattr(torch.Tensor, method, original)


def _attrs(chunks):
    from megatron_ext.models.reshard import global_names
    return {n: tuple(getattr(p, a, None) for a in ATTRS) for c in chunks for n, p in global_names(c)}


def _worker(rank: int, world_size: int, out: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    compat.setup()
    from megatron_ext.models import gpt
    from megatron_ext.train import build_loop

    record = {}
    cfg = compose_config(BASE + MODEL + ["parallel.tp=2", f"run.dir={out}/tp2"])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    vocab = 259  # the byte tokenizer's; padded to 512 rows
    with _Draws() as scratch:
        chunks = gpt.build_gpt_chunks(cfg, topo, vocab)
    with _Draws() as for_loading:
        empty = gpt.build_gpt_chunks(cfg, topo, vocab, init=False)
    ours = _attrs(chunks), _attrs(empty)
    plain = gpt.transformer_config  # megatron initialising its weights, as it did before
    gpt.transformer_config = lambda *a: dataclasses.replace(plain(*a), perform_initialization=True)
    try:
        reference = gpt.build_gpt_chunks(cfg, topo, vocab)
    finally:
        gpt.transformer_config = plain
    record.update(scratch=scratch.shapes, for_loading=for_loading.shapes, ours=ours,
                  megatron=_attrs(reference),
                  shards={n: tuple(p.shape) for n, p in _named(chunks)})
    for name, layout in (("tp2", ["parallel.tp=2"]), ("dp2", [])):
        cfg = compose_config(BASE + MODEL + layout + [f"run.dir={out}/{name}"])
        if name != "tp2":
            ps.destroy_model_parallel()
            topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
        os.makedirs(cfg.run.dir, exist_ok=True)
        record[f"grad_norm_{name}"] = build_loop(cfg, topo, cfg.run.dir).recipe.train_step(1)[
            "grad_norm"]
    ps.destroy_model_parallel()
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))


def _named(chunks):
    from megatron_ext.models.reshard import global_names
    return [(n, p) for c in chunks for n, p in global_names(c)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("build_init"))
    run_distributed(_worker, 2, out)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2)]


def test_each_weight_matrix_is_drawn_once_in_its_one_process_shape(ranks):
    for r in ranks:
        expected = []
        for name, shard in r["shards"].items():
            parallel, dim, _ = r["megatron"][name]
            if "norm" in name or "bias" in name:
                continue  # filled (ones, zeros), not drawn
            full = list(shard)
            if parallel:
                full[dim] *= 2
            if name.startswith(("embedding.", "output_layer.")):
                full[0] = 259  # the real vocab rows; the padding stays zero
            expected.append(tuple(full))
        assert len(expected) == 1 + 4 * 4 + 1  # embedding, 4 matrices a layer, output layer
        assert sorted(r["scratch"]) == sorted(expected)


def test_a_model_built_for_loading_draws_nothing(ranks):
    for r in ranks:
        assert r["for_loading"] == []


def test_tp_attributes_are_megatrons(ranks):
    for r in ranks:
        scratch, empty = r["ours"]
        assert scratch == empty == r["megatron"]
        assert r["megatron"]["decoder.layers.0.mlp.linear_fc1.weight"] == (True, 0, 2)
        assert r["megatron"]["decoder.layers.0.self_attention.linear_proj.weight"] == (True, 1, 1)
        assert r["megatron"]["output_layer.weight"] == (True, 0, 1)


def test_tp_grads_reduce_like_dp(ranks):
    """Grad-norm clipping counts a TP shard once per rank only when it is marked as one."""
    for r in ranks:
        assert r["grad_norm_tp2"] == pytest.approx(r["grad_norm_dp2"], rel=1e-5)
