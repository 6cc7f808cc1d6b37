"""Packed rows with isolated documents: document numbers, positions restarting at 0, no loss on
a target of the next document, the block-diagonal causal mask (dense at CP=1, the whole row's
ids for ring attention under CP), isolation on by default, and the config rule."""
import pytest
import torch

from megatron_ext.config.fields import ConfigError
from megatron_ext.config.load import compose_config
from megatron_ext.config.validate import validate
from megatron_ext.data.dataset import TokenRows
from megatron_ext.data.examples import Example
from megatron_ext.data.packing import document_positions, pack_documents
from megatron_ext.models.attention import document_mask, packed_attention_mask, resolve_backend


def test_rows_carry_documents_positions_and_masks():
    exs = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [1, 1]), Example([6, 7, 8, 9], [1] * 4)]
    tokens, mask, docs, truncated = pack_documents(exs, 7, pad_id=0)
    assert tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0], [6, 7, 8, 9, 0, 0, 0]]
    assert docs.tolist() == [[0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 1]] and truncated == 0
    batch = TokenRows(tokens, mask, {}, docs).batch([0])
    assert batch["document_ids"].tolist() == [[0, 0, 0, 1, 1, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # targets 2, 3 of the first example; 5 of the second; not 4 (the next document's start)
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0]]
    assert document_positions(torch.tensor([[0, 1, 1, 2]])).tolist() == [[0, 0, 1, 0]]


def test_document_mask_is_causal_within_documents():
    masked = document_mask(torch.tensor([[0, 0, 1]]))
    assert masked.shape == (1, 1, 3, 3)
    assert (~masked[0, 0]).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]


def test_isolation_is_the_default_and_needs_an_attention_that_takes_the_mask(monkeypatch):
    cfg = compose_config([])  # data.pack=true: packing without contamination
    validate(cfg, 1)
    assert cfg.data.isolate_documents and cfg.isolates_documents
    assert not compose_config(["data.isolate_documents=false"]).isolates_documents
    assert not compose_config(["data.pack=false"]).isolates_documents
    for backend in ("flash", "te"):
        with pytest.raises(ConfigError, match="data.isolate_documents=true masks attention per "
                                              f"packed document, which model.attention_backend="
                                              f"{backend} does not do at parallel.cp=1"):
            validate(compose_config([f"model.attention_backend={backend}"]), 1)
    validate(compose_config(["model.attention_backend=flash", "data.isolate_documents=false"]), 1)
    for backend in ("auto", "sdpa", "local"):
        validate(compose_config([f"model.attention_backend={backend}"]), 1)
        validate(compose_config([f"model.attention_backend={backend}", "parallel.cp=2"]), 2)
    import megatron_ext.compat as compat  # auto on a TE/flash machine: sdpa takes the mask

    monkeypatch.setattr(compat, "has_transformer_engine", lambda: True)
    assert resolve_backend("auto", "bf16", documents=True) == "sdpa"
    assert resolve_backend("auto", "bf16") == "te"


def test_packed_attention_mask_is_dense_at_cp1_and_ids_under_cp():
    docs = torch.tensor([[0, 0, 1, 1]])
    assert torch.equal(packed_attention_mask(docs, 1), document_mask(docs))
    assert packed_attention_mask(docs, 2) is docs
