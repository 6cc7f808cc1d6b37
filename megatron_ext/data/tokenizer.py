"""Tokenizers: a built-in byte-level one (no downloads), a HF `tokenizers` JSON file, and a Hugging
Face model folder (its tokenizer, chat template and EOS; never remote code)."""
from __future__ import annotations

import json
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


# What AutoTokenizer can load a tokenizer from (without one it would make an empty tokenizer).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _generation_eos(path: str):
    """The EOS ids of generation_config.json (an id or a list; [] when absent)."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return []
    with open(file) as f:
        eos = json.load(f).get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


class HFDirTokenizer:
    """AutoTokenizer of a model folder (local files only, no remote code). EOS comes from
    generation_config.json (what the model was tuned to end a turn with, e.g. <|im_end|>,
    <|eot_id|>), else tokenizer_config.json; `chat(messages)` applies its chat template.
    Generation stops at this one EOS id (the engine takes one)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer
        if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
            raise ValueError(f"data.tokenizer={path!r}: no usable tokenizer in that folder (none "
                             f"of {', '.join(TOKENIZER_FILES)}); copy the model's tokenizer "
                             "files there or give data.tokenizer=PATH")
        try:
            self._tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                      local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"data.tokenizer={path!r}: no usable tokenizer in that folder "
                             f"({err}); copy the model's tokenizer files there or give "
                             "data.tokenizer=PATH") from None
        self.vocab_size = len(self._tok)
        # of several generation EOS ids (Llama 3.1: end_of_text, eom, eot) the tokenizer's own
        # is the end of a turn; otherwise the first
        ends, own = _generation_eos(path), self._tok.eos_token_id
        self.eos_id = own if own in ends or not ends else ends[0]
        if self.eos_id is None:
            raise ValueError(f"tokenizer {path!r} names no EOS token (generation_config.json "
                             "eos_token_id or tokenizer_config.json eos_token); add one")
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self.eos_id if self._tok.pad_token_id is None else self._tok.pad_token_id
        self.chat_template = self._tok.chat_template

    def encode(self, text: str) -> List[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def prompt_ids(self, text: str) -> List[int]:
        """A plain prompt as `AutoTokenizer.from_pretrained(DIR)(text)` tokenises it (with the
        model's BOS where it adds one)."""
        return self._tok(text)["input_ids"]

    def chat(self, messages, add_generation_prompt: bool = True) -> List[int]:
        """Token ids of `messages` through the chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template; give plain prompts or set "
                             "generate.chat_template=false")
        return list(self._tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                  add_generation_prompt=add_generation_prompt))


def build_tokenizer(spec: str):
    if spec == "byte":
        return ByteTokenizer()
    return HFDirTokenizer(spec) if os.path.isdir(spec) else HFTokenizer(spec)
