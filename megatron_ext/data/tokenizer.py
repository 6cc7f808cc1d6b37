"""Tokenizers: a built-in byte-level one (no downloads) and a HF `tokenizers` JSON file."""
from __future__ import annotations

import os
from typing import List, Sequence


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; then BOS, EOS and PAD."""

    def __init__(self):
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` JSON file (tokenizer.json). BOS/EOS/PAD are looked up by common names."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data.tokenizer={path!r} does not exist; give a "
                                    "tokenizer.json path or data.tokenizer=byte")
        from tokenizers import Tokenizer
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        vocab = self._tok.get_vocab(with_added_tokens=True)

        def find(*names):
            return next((vocab[n] for n in names if n in vocab), None)

        self.eos_id = find("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r} has no EOS token (looked for </s>, "
                             "<|endoftext|>, <|end_of_text|>, <eos>); add one")
        self.bos_id = find("<s>", "<|begin_of_text|>", "<bos>")
        pad = find("<pad>", "<|pad|>")
        self.pad_id = self.eos_id if pad is None else pad

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def build_tokenizer(spec: str):
    return ByteTokenizer() if spec == "byte" else HFTokenizer(spec)
