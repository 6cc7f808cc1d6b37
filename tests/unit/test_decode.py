"""models/decode.py against the training forward, one process (TP = PP = 1): prefill of
right-padded prompts of different lengths into scattered slots, decode steps on a changing set
of slots (one idle, then resumed), a finished slot reused for a new prompt in a call that mixes
prefill and decode rows; every call's logits equal the full-sequence forward's at the same
position to 1e-5 (fp32), for the HF model variants (tests/hf_tiny.py) and our preset (fused
SwiGLU on and off, tied and untied) and GPTModels with learned positions, interleaved
RoPE and RoPE on part of each head.
TP=2 and PP=2 (x VPP=2): tests/dist/test_decode_dist.py."""
from __future__ import annotations

import pytest
import torch

TOL = 1e-5
NUM_SLOTS, MAX_LEN = 5, 24


def scenario(vocab: int, seed: int = 0):
    """The calls of a generation, as (sequences, calls): sequences[name] are the token ids a
    slot holds in the end; each call is a list of (name, slot, start, stop): the row feeds
    tokens start..stop-1 of that sequence into that slot."""
    gen = torch.Generator().manual_seed(seed)
    lens = {"a": 11, "b": 16, "c": 7, "d": 12}
    seqs = {k: torch.randint(0, vocab, (n,), generator=gen).tolist() for k, n in lens.items()}
    calls = [
        [("a", 3, 0, 5), ("b", 0, 0, 9), ("c", 4, 0, 3)],  # prefill, right-padded to 9
        [("a", 3, 5, 6), ("b", 0, 9, 10), ("c", 4, 3, 4)],  # decode, all three
        [("b", 0, 10, 11), ("c", 4, 4, 5)],  # "a" idles
        [("c", 4, 5, 6), ("a", 3, 6, 7), ("b", 0, 11, 12)],  # another row order
        [("d", 4, 0, 6), ("b", 0, 12, 13)],  # "c" is done: its slot takes "d"; mixed call
        [("a", 3, 7, 8), ("d", 4, 6, 7), ("b", 0, 13, 14)],
        [("d", 4, 7, 10), ("a", 3, 8, 11)],  # continued prefill of two rows after a cache
        [("b", 0, 14, 15), ("d", 4, 10, 12)],
    ]
    return seqs, calls


def batch(seqs, call, device, pad: int = 0):
    """(tokens [n, t], slots [n], positions [n, t], lengths [n]) of one call."""
    t = max(stop - start for _, _, start, stop in call)
    tokens = torch.full((len(call), t), pad, dtype=torch.long)
    positions = torch.zeros(len(call), t, dtype=torch.long)
    for i, (name, _, start, stop) in enumerate(call):
        tokens[i, :stop - start] = torch.tensor(seqs[name][start:stop])
        positions[i] = torch.arange(start, start + t)
    slots = torch.tensor([slot for _, slot, _, _ in call])
    lengths = torch.tensor([stop - start for _, _, start, stop in call])
    return [x.to(device) for x in (tokens, slots, positions, lengths)]


def check_scenario(step, reference, vocab: int, device, where: str) -> None:
    """step(tokens, slots, positions, lengths) -> logits [n, vocab+] (None off the last stage);
    reference(ids) -> logits [len(ids), vocab+] of the training forward over ids."""
    seqs, calls = scenario(vocab)
    want = {name: reference(ids) for name, ids in seqs.items()}
    for k, call in enumerate(calls):
        logits = step(*batch(seqs, call, device))
        if logits is None:
            continue
        assert logits.dtype == torch.float32 and logits.shape[0] == len(call), where
        for i, (name, _, _, stop) in enumerate(call):
            diff = (logits[i, :vocab] - want[name][stop - 1, :vocab]).abs().max().item()
            assert diff <= TOL, f"{where}: call {k} row {name} position {stop - 1}: {diff:.3g}"


def full_logits(model):
    """The training forward (one chunk holding the whole model) over one sequence."""
    def run(ids):
        tokens = torch.tensor([ids], device=next(model.parameters()).device)
        with torch.no_grad():
            out = model(tokens, torch.arange(len(ids), device=tokens.device)[None], None,
                        runtime_gather_output=True)
        return out[0].float()
    return run


@pytest.fixture(scope="module")
def world():
    from megatron_ext import compat

    compat.setup()
    from parallel import topology

    yield topology
    topology.destroy()


def build(world, overrides, vocab, hf_dir=None, world_size=1, ddp=False):
    """(chunks in eval mode, wrapped in megatron DDP if ddp, topology) of a fresh layout."""
    from megatron.core import parallel_state as ps

    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from megatron_ext.models.gpt import build_gpt_chunks, wrap_ddp

    cfg = compose_config(["logging=none", *overrides])
    dims = validate(cfg, world_size)
    ps.destroy_model_parallel()  # the previous layout's groups; the process group stays
    topo = world.initialize(dims, seed=cfg.seed)
    chunks = build_gpt_chunks(cfg, topo, vocab)
    if hf_dir is not None:
        from megatron_ext.convert.hf_load import load_hf_weights
        load_hf_weights(chunks, hf_dir, topo, vocab)
    if ddp:
        chunks = wrap_ddp(cfg, chunks)
    for c in chunks:
        c.eval()
    return chunks, topo


def run_decoder(chunks, vocab, where):
    from megatron_ext.models.decode import ChunkDecoder, SlotCache

    cache = SlotCache(chunks, NUM_SLOTS, MAX_LEN)
    decoder = ChunkDecoder(chunks, cache)
    check_scenario(lambda *args: decoder.forward(0, *args), full_logits(chunks[0]), vocab,
                   cache.kv.device, where)
    return cache, decoder


@pytest.mark.parametrize("overrides, ddp", [
    (["model.fused_swiglu=true", "model.init_method_std=0.2"], True),
    (["model.fused_swiglu=false", "model.init_method_std=0.2", "model.tie_embeddings=true"],
     False),
], ids=["fused_swiglu_ddp", "plain_tied"])
def test_preset_matches_training_forward(world, overrides, ddp):
    chunks, _ = build(world, overrides, 259, ddp=ddp)
    assert hasattr(chunks[0], "module") == ddp
    run_decoder(chunks, 259, " ".join(overrides))


def test_decoder_follows_weight_updates(world):
    """The decoder computes with the model's parameters, not a copy: after an in-place update
    (as the optimizer makes) it matches the training forward of the new weights."""
    chunks, _ = build(world, ["model.init_method_std=0.2"], 259)
    cache, decoder = run_decoder(chunks, 259, "before")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in chunks[0].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    check_scenario(lambda *args: decoder.forward(0, *args), full_logits(chunks[0]), 259,
                   cache.kv.device, "after an update")


@pytest.mark.parametrize("kind", ["llama_tied", "llama_linear", "qwen2_tied", "qwen3"])
def test_hf_variants_match_training_forward(world, tmp_path, kind):
    from tests.hf_tiny import VOCAB, make_hf_model

    make_hf_model(kind, str(tmp_path))
    chunks, _ = build(world, ["model=hf", f"model.hf_path={tmp_path}"], VOCAB, str(tmp_path))
    run_decoder(chunks, VOCAB, kind)


def test_learned_positions_match_training_forward(world):
    """A GPTModel with learned absolute positions (no RoPE), which our builder never makes."""
    from megatron_ext.config.load import compose_config
    from megatron_ext.models.fused_loss import VocabGPTModel
    from megatron_ext.models.gpt import layer_spec, transformer_config

    _, topo = build(world, [], 259)  # the process groups
    cfg = compose_config(["logging=none", "model.init_method_std=0.2"])
    spec, _ = layer_spec(cfg)
    torch.manual_seed(0)
    model = VocabGPTModel(config=transformer_config(cfg, topo), transformer_layer_spec=spec,
                          vocab_size=384, real_vocab_size=259, max_sequence_length=MAX_LEN,
                          position_embedding_type="learned_absolute").eval()
    assert model.embedding.add_position_embedding and not hasattr(model, "rotary_pos_emb")
    with torch.no_grad():  # transformer_config turns megatron's init off: draw the weights here
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    run_decoder([model], 259, "learned_absolute")


@pytest.mark.parametrize("interleaved, percent", [(True, 1.0), (False, 0.5), (True, 0.5)],
                         ids=["interleaved", "half_rotary", "interleaved_half"])
def test_rope_variants_match_training_forward(world, interleaved, percent):
    """GPTModels with interleaved RoPE and RoPE on part of each head (rotary_percent), which
    our builder never makes: the decoder's RoPE on the QKV output in place covers them."""
    from megatron_ext.config.load import compose_config
    from megatron_ext.models.fused_loss import VocabGPTModel
    from megatron_ext.models.gpt import layer_spec, transformer_config

    _, topo = build(world, [], 259)  # the process groups
    cfg = compose_config(["logging=none"])
    spec, _ = layer_spec(cfg)
    config = transformer_config(cfg, topo)
    config.rotary_interleaved = interleaved  # (replace() would rerun megatron's TE checks)
    torch.manual_seed(0)
    model = VocabGPTModel(config=config, transformer_layer_spec=spec, vocab_size=384,
                          real_vocab_size=259, max_sequence_length=MAX_LEN,
                          position_embedding_type="rope", rotary_percent=percent).eval()
    with torch.no_grad():  # transformer_config turns megatron's init off: draw the weights here
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    run_decoder([model], 259, f"interleaved={interleaved} rotary_percent={percent}")


def test_released_cache_and_bad_inputs_are_errors(world):
    from megatron_ext.models.decode import ChunkDecoder, SlotCache

    chunks, _ = build(world, [], 259)
    cache = SlotCache(chunks, 2, 8)
    decoder = ChunkDecoder(chunks, cache)
    tokens, slots, positions, lengths = (torch.zeros(2, 3, dtype=torch.long),
                                         torch.tensor([0, 1]), torch.arange(3).expand(2, -1),
                                         torch.tensor([3, 2]))
    assert decoder.forward(0, tokens, slots, positions, lengths).shape == (2, 384)
    layer, lean = chunks[0].decoder.layers[0], decoder.layers[0][0]  # megatron's local spec:
    assert lean.qkv is not layer.self_attention.linear_qkv and lean.mlp is not layer.mlp  # lean
    with pytest.raises(ValueError, match=r"slots \(1,\) and lengths \(2,\) must both be \[n\]"):
        decoder.forward(0, tokens, slots[:1], positions, lengths)
    with pytest.raises(ValueError, match="a position reaches 8, beyond the cache's max_len=8"):
        decoder.forward(0, tokens, slots, positions + 6, lengths)
    with pytest.raises(ValueError, match=r"kv_len=9 must be in \[1, max_len=8\]"):
        decoder.forward(0, tokens, slots, positions, lengths, kv_len=9)
    with pytest.raises(ValueError, match="max_len=70000 exceeds the model's max_sequence_length"):
        SlotCache(chunks, 2, 70000)
    other, _ = build(world, [], 259)
    with pytest.raises(ValueError, match="the SlotCache was made for other chunks"):
        ChunkDecoder(other, cache)
    cache.release()
    with pytest.raises(RuntimeError, match="the SlotCache was released"):
        decoder.forward(0, tokens, slots, positions, lengths)
    other[0].config.sequence_parallel = True
    with pytest.raises(NotImplementedError, match="sequence_parallel=True"):
        ChunkDecoder(other, SlotCache(other, 1, 4))
