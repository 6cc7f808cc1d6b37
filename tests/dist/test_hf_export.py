"""Streamed export (convert/export.py): a checkpoint saved at TP2xPP2 or PP2xVPP2 exports to the
very tensors of the TP1 save (and of the HF source), and the export's peak memory stays far
below the model's size, even when one shard holds it all (it reads one tensor, one layer, at a
time and writes each straight to its file; a whole-model export holds the model at least
twice)."""
import glob
import json
import os

import pytest
import torch

from benchmarks.hf_convert import measured_convert
from tests.dist._spawn import run_distributed
from tests.hf_tiny import VOCAB, make_hf_model, save_tokenizer

LAYOUTS = {"tp1": [], "tp2pp2": ["parallel.tp=2", "parallel.pp=2"],
           "pp2vpp2": ["parallel.pp=2", "parallel.vpp=2"]}
KINDS = ("qwen2_tied", "qwen3")


def _save_layouts(rank: int, world_size: int, hf_dirs: dict, root: str) -> None:
    """Each HF model of `hf_dirs` loaded in every layout and saved as <root>/<kind>-<layout>."""
    from megatron.core import parallel_state as ps
    import torch.distributed as dist

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    compat.setup()
    from megatron_ext.convert.hf_load import load_hf_weights
    from megatron_ext.convert.origin import ModelOrigin
    from megatron_ext.models.gpt import build_gpt_chunks
    from megatron_ext.training.checkpoint import CheckpointManager, ModelPart, model_shape
    for kind, hf_dir in hf_dirs.items():
        for layout, overrides in LAYOUTS.items():
            cfg = compose_config(["logging=none", "model=hf", f"model.hf_path={hf_dir}",
                                  "train.seq_len=16", "train.micro_batch_size=1",
                                  "train.global_batch_size=4", *overrides])
            topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
            chunks = build_gpt_chunks(cfg, topo, VOCAB)
            load_hf_weights(chunks, hf_dir, topo, VOCAB)
            manager = CheckpointManager(os.path.join(root, f"{kind}-{layout}"), topo, keep=1,
                                        sharded={"model": ModelPart(chunks)},
                                        states={"origin": ModelOrigin(cfg)},
                                        shape=model_shape(cfg.model, VOCAB, chunks),
                                        log=lambda _: None)
            manager.save(0)
            ps.destroy_model_parallel()
            dist.barrier()


def _tensors(folder):
    from safetensors.torch import load_file
    out = {}
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tied Qwen2 (QKV bias) and untied Qwen3 (QK-norm) saved in every layout of LAYOUTS."""
    root = tmp_path_factory.mktemp("hf_export")
    for kind in KINDS:
        make_hf_model(kind, str(root / kind))
    run_distributed(_save_layouts, 4, {k: str(root / k) for k in KINDS}, str(root),
                    timeout_s=300)
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_export_of_any_layout_equals_the_tp1_export(saved, kind):
    from megatron_ext.convert.export import export_checkpoint
    tmp_path = saved
    source = _tensors(saved / kind)
    exports = {}
    for layout in LAYOUTS:
        ckpt = tmp_path / f"{kind}-{layout}" / "step_00000000"
        assert json.load(open(ckpt / "train_state.json"))["layout"]["pp"] == (
            1 if layout == "tp1" else 2)
        out = tmp_path / f"out-{kind}-{layout}"
        export_checkpoint(str(ckpt), str(out), max_shard_bytes=40_000)
        exports[layout] = _tensors(out)
        index = json.load(open(out / "model.safetensors.index.json"))
        assert sorted(index["weight_map"]) == sorted(source)
        assert len(set(index["weight_map"].values())) > 1  # several shards, each written once
    for layout, tensors in exports.items():
        assert sorted(tensors) == sorted(exports["tp1"]), layout
        for name, tensor in tensors.items():
            assert torch.equal(tensor, exports["tp1"][name]), (layout, name)
            assert torch.equal(tensor, source[name]), (layout, name)


def test_export_memory_stays_far_below_the_model(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig
    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "out"
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(src)
    save_tokenizer(str(src))
    measured_convert("import", "--hf", str(src), "--out", str(ckpt))
    model_bytes = sum(t.numel() * t.element_size() for t in _tensors(src).values())
    # the default shard size (5 GiB): one shard holds the whole model
    _, growth = measured_convert("export", "--checkpoint", str(ckpt), "--out", str(out))
    assert model_bytes > 90 * 2 ** 20
    # about the largest tensor (a layer's fc1, 6 MiB) and its HF parts, far from the model
    assert growth < model_bytes / 4, (growth, model_bytes)
    exported, source = _tensors(out), _tensors(src)
    assert sorted(exported) == sorted(source)
    assert all(torch.equal(exported[k], source[k]) for k in source)
    assert glob.glob(str(out / "*.safetensors")) == [str(out / "model-00001-of-00001.safetensors")]
