"""Preprocess to megatron's IndexedDataset and the data=indexed source: exact read-back, blend
ratios, resumable sampling, and middle pipeline stages that never open a .bin file."""
import collections
import json
import types

import numpy
import pytest
from megatron.core.datasets import indexed_dataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_ext.config.fields import ConfigError
from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import validate
from megatron_ext.data.examples import DataError
from megatron_ext.data.indexed import build_indexed
from megatron_ext.data.preprocess import main as preprocess_main
from megatron_ext.data.preprocess import preprocess
from megatron_ext.data.sampler import GlobalBatchSampler
from megatron_ext.data.tokenizer import ByteTokenizer, HFTokenizer

DOCS = ["hello world", "", "π ≈ 3.14159", "x" * 300, "a\nb\tc"]


def _corpus(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_reads_back_each_document_then_eos(tmp_path, capsys, workers):
    src = _corpus(tmp_path / "c.jsonl", DOCS)
    summary = preprocess_main(["--input", src, "--output-prefix", str(tmp_path / "out" / "c"),
                               "--workers", str(workers)])
    tok = ByteTokenizer()
    ds = IndexedDataset(str(tmp_path / "out" / "c"))
    assert len(ds) == len(DOCS)
    for i, doc in enumerate(DOCS):
        assert ds[i].tolist() == tok.encode(doc) + [tok.eos_id]
    want_tokens = sum(len(tok.encode(d)) + 1 for d in DOCS)
    assert summary["documents"] == len(DOCS) and summary["tokens"] == want_tokens
    out = capsys.readouterr().out
    assert f"{len(DOCS)} documents, {want_tokens} tokens" in out and " s (" in out


def test_preprocess_with_a_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, "[UNK]": 2, "hello": 3, "world": 4}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "tokenizer.json"))
    src = _corpus(tmp_path / "c.jsonl", ["hello world", "world x hello"])
    preprocess([src], "text", str(tmp_path / "tokenizer.json"), str(tmp_path / "c"))
    ds = IndexedDataset(str(tmp_path / "c"))
    assert [ds[i].tolist() for i in range(2)] == [[3, 4, 1], [4, 2, 3, 1]]
    assert ds[0].dtype == numpy.uint16  # megatron's smallest dtype for the vocab
    assert HFTokenizer(str(tmp_path / "tokenizer.json")).eos_id == 1


def test_preprocess_malformed_lines_by_file_and_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "ok"}\n{broken\n{"text": 3}\n{"text": "fine"}\n')
    with pytest.raises(DataError, match=rf"{src}:2: malformed line .*--on-malformed skip"):
        preprocess([str(src)], "text", "byte", str(tmp_path / "c"))
    s = preprocess([str(src)], "text", "byte", str(tmp_path / "c"), on_malformed="skip")
    assert (s["documents"], s["skipped"]) == (2, 2)
    with pytest.raises(SystemExit) as exit_info:
        preprocess_main(["--input", str(src), "--output-prefix", str(tmp_path / "d"),
                         "--json-key", "body"])
    assert exit_info.value.code == 2


def _two_datasets(tmp_path):
    prefixes = []
    for name, letter in (("a", "A"), ("b", "B")):
        docs = [letter * (5 + (7 * i) % 60) for i in range(400)]
        prefixes.append(str(tmp_path / "data" / name))
        preprocess([_corpus(tmp_path / f"{name}.jsonl", docs)], "text", "byte", prefixes[-1])
    return prefixes


def _cfg(prefixes, weights=(0.7, 0.3), steps=625, **extra):
    blend = ",".join(f"{w},{p}" for w, p in zip(weights, prefixes))
    return compose_config(["stage=pretrain", "data=indexed", f"data.blend=[{blend}]",
                           "train.seq_len=32", "train.global_batch_size=16",
                           f"train.steps={steps}", "train.eval_samples=64",
                           *[f"{k}={v}" for k, v in extra.items()]])


def _stage(first, last):
    return types.SimpleNamespace(is_first_stage=first, is_last_stage=last)


def test_blend_draws_in_the_asked_ratio_and_holds_out_a_split(tmp_path, megatron_single_rank):
    prefixes = _two_datasets(tmp_path)
    cfg = _cfg(prefixes)
    validate(cfg, 1)
    train, held = build_indexed(cfg, _stage(True, True), ByteTokenizer())
    assert len(train) == 10_000 and len(held) == 64
    sampler = GlobalBatchSampler(len(train), 16, 16, 0, 1, cfg.seed)
    drawn = [i for _ in range(625) for mb in sampler.next_step() for i in mb]
    counts = collections.Counter(train.dataset_ids(drawn))
    assert abs(counts[0] / 10_000 - 0.7) < 0.02 and abs(counts[1] / 10_000 - 0.3) < 0.02
    batch = train.batch(drawn[:4])
    assert batch["tokens"].shape == (4, 32) and bool((batch["labels"][:, :-1]
                                                      == batch["tokens"][:, 1:]).all())
    # the samples come from the letters' documents (and EOS) only
    assert set(batch["tokens"].unique().tolist()) <= {ord("A"), ord("B"), 257}
    assert list((tmp_path / "data" / "cache").glob("*-GPTDataset-train-sample_index.npy"))
    assert list((tmp_path / "data" / "cache").glob("*-GPTDataset-valid-sample_index.npy"))


def test_resumed_sampler_sees_the_same_samples(tmp_path, megatron_single_rank):
    cfg = _cfg(_two_datasets(tmp_path), steps=40)
    train, _ = build_indexed(cfg, _stage(True, True), ByteTokenizer())
    whole = GlobalBatchSampler(len(train), 16, 4, 0, 1, cfg.seed)
    steps = [[train.batch(mb)["tokens"] for mb in whole.next_step()] for _ in range(10)]
    first = GlobalBatchSampler(len(train), 16, 4, 0, 1, cfg.seed)
    for _ in range(6):
        first.next_step()
    again, _ = build_indexed(cfg, _stage(True, True), ByteTokenizer())  # from the cache
    resumed = GlobalBatchSampler(len(again), 16, 4, 0, 1, cfg.seed)
    resumed.load_state_dict(first.state_dict())
    for want in steps[6:]:
        got = [again.batch(mb)["tokens"] for mb in resumed.next_step()]
        assert all(bool((g == w).all()) for g, w in zip(got, want))


def test_middle_pipeline_stage_never_opens_a_bin_file(tmp_path, megatron_single_rank,
                                                      monkeypatch):
    cfg = _cfg(_two_datasets(tmp_path), steps=10)
    build_indexed(cfg, _stage(True, True), ByteTokenizer())  # rank 0 writes the cached indices
    opened = []
    real_open, real_memmap = open, numpy.memmap
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)),
                                                             real_open(p, *a, **k))[1])
    monkeypatch.setattr(indexed_dataset.numpy, "memmap",
                        lambda p, *a, **k: (opened.append(str(p)), real_memmap(p, *a, **k))[1])
    train, held = build_indexed(cfg, _stage(False, False), ByteTokenizer())
    batch = train.batch([0, 1, 2])
    assert train.dataset is None and held.dataset is None
    assert batch["tokens"].shape == (3, 32) and float(batch["loss_mask"].sum()) == 0.0
    assert not [p for p in opened if p.endswith(".bin")]
    build_indexed(cfg, _stage(False, True), ByteTokenizer())  # the last stage does read them
    assert [p for p in opened if p.endswith(".bin")]


def test_config_needs_existing_bin_and_idx(tmp_path):
    prefixes = _two_datasets(tmp_path)
    (tmp_path / "data" / "b.idx").unlink()
    with pytest.raises(ConfigError, match=r"data.blend prefix .*b\.idx does not exist; run "
                                          r"python -m megatron_ext.data.preprocess"):
        validate(_cfg(prefixes), 1)
    with pytest.raises(ConfigError, match="data.source=indexed needs data.blend"):
        validate(compose_config(["data=indexed", "data.blend=[]"]), 1)
    with pytest.raises(ConfigError, match=r"data.split=\[0.0, 1.0, 0.0\] must be three"):
        validate(_cfg(prefixes[:1], weights=(1,), **{"data.split": "[0,1,0]"}), 1)
