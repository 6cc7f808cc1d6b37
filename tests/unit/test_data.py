"""Task, tokenizers, JSONL reading, packing and the DP sampler."""
import json

import pytest
import torch

from megatron_ext.config.load import compose_config
from megatron_ext.data.dataset import build_rows
from megatron_ext.data.examples import DataError, Example, read_jsonl
from megatron_ext.data.packing import pack
from megatron_ext.data.sampler import GlobalBatchSampler
from megatron_ext.data.task import ArithmeticTask, extract_answer, is_heldout, render, verify
from megatron_ext.data.tokenizer import ByteTokenizer, HFTokenizer


def test_task_is_deterministic_and_heldout_is_disjoint():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert [p.expression for p in a.take(50)] == [p.expression for p in b.take(50)]
    train = {p.expression for p in a.take(2000)}
    held = {p.expression for p in a.take(100, "heldout")}
    assert not train & held
    assert all(is_heldout(e) for e in held)


def test_task_solution_steps_and_verifier():
    p = next(p for p in ArithmeticTask(0, min_ops=2, max_ops=2).problems() if "*" in p.expression
             and "+" in p.expression)
    text = render(p, "target")
    lines = text.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == f"A: {p.answer}"
    assert "*" in lines[0]  # multiplication first
    assert eval(p.expression) == p.answer  # the test may; the task never evaluates text
    assert verify(text, p) and not verify(text.replace(f"A: {p.answer}", f"A: {p.answer + 1}"), p)
    assert extract_answer("no answer here") is None


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("Q: 3+4*2\nπ")
    assert max(ids) < 256 and tok.decode(ids) == "Q: 3+4*2\nπ"
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "[UNK]": 3, "hello": 4, "world": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    hf = HFTokenizer(str(path))
    assert hf.encode("hello world") == [4, 5]
    assert (hf.eos_id, hf.bos_id, hf.pad_id, hf.vocab_size) == (1, 2, 0, 6)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(str(tmp_path / "nope.json"))


def test_jsonl_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{broken\n"
                    + json.dumps({"prompt": 1, "response": "x"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed line"):
        list(read_jsonl(str(path)))
    stats = {}
    assert list(read_jsonl(str(path), "skip", stats)) == [("a", "b")]
    assert stats["skipped"] == 2


def test_packing_fills_rows_and_masks_prompts():
    exs = [Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [0, 1]), Example([6] * 9, [1] * 9)]
    rows, mask, truncated = pack(exs, 6, pad_id=0)
    assert rows.tolist() == [[1, 2, 3, 4, 5, 0], [6] * 6]
    assert mask.tolist() == [[0, 1, 1, 0, 1, 0], [1] * 6]
    assert truncated == 1
    rows, _, _ = pack(exs[:2], 6, pad_id=0, packed=False)
    assert rows.tolist() == [[1, 2, 3, 0, 0, 0], [4, 5, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        pack([], 6, 0)


def test_sft_rows_mask_the_prompt():
    cfg = compose_config(["data.num_samples=8", "data.pack=false"])
    rows = build_rows(cfg, ByteTokenizer())
    batch = rows.batch([0])
    tok = ByteTokenizer()
    first = ArithmeticTask(0).take(1)[0]
    n_prompt = 1 + len(first.prompt)  # BOS + prompt
    mask = batch["loss_mask"][0]
    # labels are shifted by one: the first response token is label n_prompt - 1
    assert mask[: n_prompt - 1].sum() == 0 and mask[n_prompt - 1] == 1
    assert tok.decode(batch["labels"][0][mask.bool()].tolist()) == first.response()


def test_sampler_global_batches_do_not_depend_on_dp():
    one = GlobalBatchSampler(100, 8, 2, 0, 1, seed=5)
    ranks = [GlobalBatchSampler(100, 8, 2, r, 2, seed=5) for r in range(2)]
    for _ in range(30):  # crosses epoch boundaries
        full = sorted(i for mb in one.next_step() for i in mb)
        split = sorted(i for s in ranks for mb in s.next_step() for i in mb)
        assert full == split
    resumed = GlobalBatchSampler(100, 8, 2, 0, 1, seed=5, consumed_samples=one.consumed_samples)
    assert resumed.next_step() == one.next_step()
