"""A stand-in for models/decode.py in engine tests: a model whose next-token logits are a
function of the whole sequence so far (`logits_of(tokens) -> [padded vocab]`), served through
SlotCache / ChunkDecoder's interface. It keeps each slot's tokens, checks every call the way
the engine must make it (a prefill starts a slot at positions 0..n-1, a decode step continues
it at its length, kv_len covers the rows) and counts prefills."""

import types

import torch

import megatron_ext.models.generate as engine_module


class ScriptedModel(torch.nn.Module):
    pre_process = post_process = True
    max_sequence_length = 1000

    def __init__(self, logits_of):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = types.SimpleNamespace(hidden_size=4, pipeline_dtype=None,
                                            params_dtype=torch.float32, sequence_parallel=False)
        self.logits_of = logits_of
        self.slots = {}  # slot -> its tokens (what a KV cache holds)
        self.prefills = []  # (slot, prompt) of each prefilled row
        self.decode_calls = 0

    def forward(self, inputs, slots, positions, lengths, kv_len):
        assert not self.training
        n, t = positions.shape
        assert inputs.shape == (n, t) and lengths.shape == slots.shape == (n,)
        assert len(set(slots.tolist())) == n, "a slot appears twice in one call"
        assert kv_len == int((positions.gather(1, lengths[:, None] - 1)).max()) + 1
        out = []
        for row, slot in enumerate(slots.tolist()):
            length = int(lengths[row])
            ids = inputs[row, :length].tolist()
            if t > 1 or int(positions[row, 0]) == 0:  # a prefill starts the slot afresh
                assert positions[row, :length].tolist() == list(range(length))
                self.slots[slot] = ids
                self.prefills.append((slot, ids))
            else:
                assert length == 1 and int(positions[row, 0]) == len(self.slots[slot])
                self.slots[slot] = self.slots[slot] + ids
            out.append(self.logits_of(self.slots[slot]))
        self.decode_calls += t == 1
        return torch.stack(out).float()


class ScriptedCache:
    def __init__(self, chunks, num_slots, max_len):
        self.num_slots, self.max_len, self.released = num_slots, max_len, False
        chunks[0].cache = self

    def release(self):
        self.released = True


class ScriptedDecoder:
    def __init__(self, chunks, cache):
        self.model = chunks[0]

    def __call__(self, v, inputs, slots, positions, lengths, kv_len=None, view=None):
        assert v == 0
        assert view is None or list(range(self.model.cache.num_slots)[view]) == slots.tolist()
        return self.model(inputs, slots, positions, lengths, kv_len)


def use_scripted(monkeypatch):
    """Serve the engine's decoding from ScriptedModel."""
    monkeypatch.setattr(engine_module, "SlotCache", ScriptedCache)
    monkeypatch.setattr(engine_module, "ChunkDecoder", ScriptedDecoder)
