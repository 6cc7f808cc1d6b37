"""Chat SFT examples: `{"messages": [{"role", "content"}, ...]}` rendered by the tokenizer's
chat template (transformers' `apply_chat_template`), with the loss on the assistant turns only,
each turn's end-of-turn token included.

The assistant spans are found by rendering the conversation up to each assistant turn, with
and without it: the text the turn adds (its content and the template's end-of-turn marker) is
the span, whatever the template. Templates whose rendering of a prefix is not a prefix of the
whole (some drop earlier reasoning) are refused with a message."""
from __future__ import annotations

from typing import Dict, List

from megatron_ext.data.examples import Example

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages) -> List[Dict[str, str]]:
    """The messages list, or ValueError naming what is wrong (for a file:line message)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list of {"role", "content"}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise ValueError(f"messages[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                             '"content": a string}')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to train on")
    return messages


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_segments(tokenizer, messages) -> List[tuple]:
    """The rendered conversation as (text, is_assistant) segments, in order."""
    full = _render(tokenizer, messages, False)
    segments, pos = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        after = _render(tokenizer, messages[:i + 1], False)
        if not (full.startswith(after) and after.startswith(before) and len(before) >= pos):
            raise ValueError("the chat template does not render a conversation's start as a "
                             "prefix of the whole (it rewrites earlier turns), so assistant "
                             "spans cannot be located; use another template")
        span = after[len(before):]
        turn_end = len(before) + len(span.rstrip())  # the newline after the marker is not
        segments += [(full[pos:len(before)], False), (full[len(before):turn_end], True)]
        pos = turn_end
    segments.append((full[pos:], False))
    return [(text, mask) for text, mask in segments if text]


def encode_chat(tokenizer, messages) -> Example:
    """Token ids of the rendered conversation with 1 on the assistant spans. Each segment is
    encoded alone (special tokens in the text are the tokenizer's added tokens), so a span's
    tokens are exactly its own."""
    tokens: List[int] = []
    mask: List[int] = []
    for text, is_assistant in chat_segments(tokenizer, check_messages(messages)):
        ids = tokenizer.encode(text)
        tokens += ids
        mask += [int(is_assistant)] * len(ids)
    return Example(tokens, mask)
