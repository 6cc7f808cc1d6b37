"""Chat SFT: the loss mask covers exactly the assistant turns (their end-of-turn token included)
of conversations rendered by a real transformers chat template; over-long examples."""
import json

import pytest

from megatron_ext.config.load import compose_config
from megatron_ext.data.chat import chat_segments, encode_chat
from megatron_ext.data.dataset import build_rows, summary
from megatron_ext.data.examples import DataError

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6, surely"}]


class ChatTokenizer:
    """A character-level transformers tokenizer with a ChatML template, behind the interface
    the trainer's tokenizers have (encode without added special tokens, ids of EOS/PAD)."""

    def __init__(self):
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        vocab = {chr(i): i for i in range(32, 127)} | {"\n": 10, "<|im_start|>": 1,
                                                       "<|im_end|>": 2, "<pad>": 0}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
        self.hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE,
                                          eos_token="<|im_end|>", pad_token="<pad>",
                                          additional_special_tokens=["<|im_start|>"])
        self.eos_id, self.pad_id, self.bos_id, self.vocab_size = 2, 0, None, 127

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages, **kw):
        return self.hf.apply_chat_template(messages, **kw)


def test_loss_mask_is_exactly_the_assistant_turns():
    tok = ChatTokenizer()
    ex = encode_chat(tok, CHAT)
    assert ex.tokens == tok.encode(tok.apply_chat_template(CHAT, tokenize=False))
    trained = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
    assert trained == tok.encode("4<|im_end|>") + tok.encode("6, surely<|im_end|>")
    spans = [text for text, assistant in chat_segments(tok, CHAT) if assistant]
    assert spans == ["4<|im_end|>", "6, surely<|im_end|>"]


def _chat_file(tmp_path, convs):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return str(path)


def test_chat_rows_and_overlong_policies(tmp_path):
    tok = ChatTokenizer()
    long = CHAT[:2] + [{"role": "assistant", "content": "x" * 200}]
    path = _chat_file(tmp_path, [CHAT, long, CHAT])
    base = ["data=jsonl", f"data.path={path}", "train.seq_len=96", "data.pack=false"]
    rows = build_rows(compose_config(base + ["data.overlong=drop"]), tok)
    assert rows.stats["dropped"] == 1 and len(rows) == 2
    batch = rows.batch([0])
    ex = encode_chat(tok, CHAT)  # the labels the loss weighs are the assistant tokens
    want = [t for t, m in zip(ex.tokens, ex.loss_mask) if m]
    assert batch["labels"][0][batch["loss_mask"][0].bool()].tolist() == want
    assert "1 dropped" in summary(rows)
    rows = build_rows(compose_config(base), tok)  # truncate, the default
    assert rows.stats["truncated"] == 1 and len(rows) == 3 and "1 truncated" in summary(rows)
    with pytest.raises(DataError, match=r"example 2 has \d+ tokens, more than a row of "
                                        r"train.seq_len \+ 1 = 97 .*data.overlong=truncate"):
        build_rows(compose_config(base + ["data.overlong=error"]), tok)


def test_chat_records_need_a_template_and_an_assistant_turn(tmp_path):
    from megatron_ext.data.tokenizer import ByteTokenizer
    cfg = compose_config(["data=jsonl", f"data.path={_chat_file(tmp_path, [CHAT])}"])
    with pytest.raises(DataError, match="needs a tokenizer with a chat template"):
        build_rows(cfg, ByteTokenizer())
    bad = _chat_file(tmp_path, [CHAT[:2]])
    with pytest.raises(DataError, match=r"chat.jsonl:1: malformed line \(no assistant turn"):
        build_rows(compose_config(["data=jsonl", f"data.path={bad}"]), ChatTokenizer())
