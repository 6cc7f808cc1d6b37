"""`python -m megatron_ext.generate <overrides>`: responses of a checkpoint (generate.checkpoint=
PATH) or of a Hugging Face model (model=hf model.hf_path=DIR) to the prompts of a JSONL file,
through the generation engine of RL rollouts and eval (models/generate.py), in batches of
generate.max_batch prompts (the engine's sequence slots). Under TP/PP/DP start it like
training: `python -m launch local --nproc N --entry generate -- <overrides>`; each DP replica answers its contiguous share of the prompts
(its TP/PP ranks together), and global rank 0 gathers them and writes generate.out in the
input order, one record per prompt: prompt, response, token_ids (generated, EOS included),
logprobs (per generated token, at temperature 1 over the real vocab, whatever the sampling
temperature) and finish_reason (eos | length)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

from megatron_ext import compat
from megatron_ext.config.fields import ConfigError
from megatron_ext.config.hf import recorded_tokenizer
from megatron_ext.config.load import checked_config
from megatron_ext.config.schema import Config
from megatron_ext.config.validate import validate
from parallel import topology


def with_checkpoint_model(cfg: Config) -> Config:
    """generate.checkpoint: the model shape (and, unless data.tokenizer names one, the
    tokenizer) the checkpoint recorded."""
    path = cfg.generate.checkpoint
    if not path:
        if not cfg.model.hf_path:
            raise ConfigError("generate needs generate.checkpoint=PATH or model=hf "
                              "model.hf_path=DIR")
        return cfg
    if not os.path.isfile(os.path.join(path, "train_state.json")):
        raise ConfigError(f"generate.checkpoint={path!r} is not a checkpoint folder (no "
                          "train_state.json); give RUN/checkpoints/step_N")
    from megatron_ext.convert.export import checkpoint_model_fields
    from megatron_ext.training.checkpoint import read_train_state
    state = read_train_state(path)
    if "origin" not in state:
        raise ConfigError(f"generate.checkpoint={path!r} records no model origin; it predates "
                          "this version")
    model = dataclasses.replace(cfg.model, **checkpoint_model_fields(state), hf_path=None)
    data = cfg.data
    if data.tokenizer == "byte":
        data = dataclasses.replace(data, tokenizer=recorded_tokenizer(
            state["origin"], f"generate.checkpoint={path!r}"))
    return dataclasses.replace(cfg, model=model, data=data)


def read_prompts(path: Optional[str]) -> List[Dict]:
    if not path or not os.path.isfile(path):
        raise ConfigError(f"generate.prompts={path!r} is not a file; give a JSONL of "
                          '{"prompt": ...} or {"messages": [...]} records')
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("prompt"), str) and not isinstance(record.get("messages"), list):
                raise ConfigError(f"{path}:{n} has neither a \"prompt\" string nor a "
                                  "\"messages\" list")
            records.append(record)
    if not records:
        raise ConfigError(f"generate.prompts={path!r} holds no records")
    return records


def prompt_ids(record: Dict, tokenizer, chat_template: str) -> List[int]:
    """Token ids of one record: chat messages through the tokenizer's chat template, a plain
    prompt as AutoTokenizer tokenises it (through the template with chat_template=true)."""
    use_template = chat_template.lower() == "true" or (chat_template == "auto" and "messages" in record)
    if use_template:
        if not hasattr(tokenizer, "chat"):
            raise ValueError("the byte tokenizer has no chat template; use plain prompts with "
                             "generate.chat_template=false")
        messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
        return tokenizer.chat(messages)
    if "prompt" not in record:
        raise ValueError("a \"messages\" record needs the chat template; set "
                         "generate.chat_template=auto or true")
    encode = getattr(tokenizer, "prompt_ids", tokenizer.encode)
    return encode(record["prompt"])


def dp_share(count: int, batch_size: int, dp: int, dp_rank: int) -> range:
    """The indices of the prompts DP rank `dp_rank` of `dp` answers: a contiguous run of whole
    batches (the first ranks one batch more), so each batch is the one a single process runs,
    with the same padding and so the same numbers."""
    batches = -(-count // batch_size)
    base, extra = divmod(batches, dp)
    first = dp_rank * base + min(dp_rank, extra)
    last = first + base + (dp_rank < extra)
    return range(min(first * batch_size, count), min(last * batch_size, count))


def _replica_lead(topo) -> bool:
    return topo.tp_rank == 0 and topo.pp_rank == 0 and topo.cp_rank == 0


def gather_records(answered: List[Dict], share: range, topo, count: int) -> Optional[List[Dict]]:
    """Every DP replica's records on global rank 0, in the input order (None elsewhere); one
    rank of each replica (TP, PP and CP rank 0) sends its share."""
    from megatron_ext.training.collectives import gather_objects
    parts = gather_objects((share.start, answered) if _replica_lead(topo) else None)
    if parts is None:
        return None
    records: List[Optional[Dict]] = [None] * count
    for first, part in filter(None, parts):
        records[first:first + len(part)] = part
    assert None not in records, "a DP replica's records are missing"
    return records


def run(cfg: Config, topo, log) -> Optional[List[Dict]]:
    """The output records of every prompt, in the input order, on global rank 0 (None on the
    other ranks); each DP replica generates its share (dp_share)."""
    import torch

    from megatron_ext.data.tokenizer import build_tokenizer
    from megatron_ext.models.generate import SamplingParams, generate
    from megatron_ext.models.gpt import build_gpt_chunks, model_vocab_size
    g = cfg.generate
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    vocab = model_vocab_size(cfg, tokenizer)
    chunks = build_gpt_chunks(cfg, topo, vocab, init=False)  # the weights are loaded below
    if g.checkpoint:
        from megatron_ext.training.checkpoint import CheckpointManager, ModelPart, model_shape
        CheckpointManager(os.path.join(g.checkpoint, ".unused"), topo, keep=1,
                          sharded={"model": ModelPart(chunks)}, states={},
                          shape=model_shape(cfg.model, vocab, chunks),
                          log=log).load(g.checkpoint, only=("model",))
    else:
        from megatron_ext.convert.hf_load import load_hf_weights
        load_hf_weights(chunks, cfg.model.hf_path, topo, vocab)
    records = read_prompts(g.prompts)
    dp = topo.dims.dp
    share = dp_share(len(records), g.max_batch, dp, topo.dp_rank)
    mine = records[share.start:share.stop]
    where = (f" on DP rank {topo.dp_rank} of {dp} (records {share.start + 1}-{share.stop} of "
             f"{len(records)})" if dp > 1 else "")
    params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                            top_p=g.top_p, logprob_temperature=1.0)  # what a user reads
    # each DP replica its own sampling stream (DP1 keeps the seed's)
    generator = torch.Generator(device=topo.device).manual_seed(cfg.seed + topo.dp_rank)
    tp = topo.tp_group if topo.dims.tp > 1 else None
    pp = topo.pp_group if topo.dims.pp > 1 else None
    out, started = [], time.perf_counter()
    for first in range(0, len(mine), g.max_batch):
        batch = mine[first:first + g.max_batch]
        ids = [prompt_ids(r, tokenizer, g.chat_template) for r in batch]
        roll = generate(chunks, ids, tokenizer, params, vocab_size=vocab, generator=generator,
                        tp_group=tp, pp_group=pp, num_slots=g.max_batch, engine=g.engine,
                        cuda_graphs=g.cuda_graphs)
        for i, record in enumerate(batch):
            start, n = int(roll.prompt_lens[i]), int(roll.response_lens[i])
            out.append({"prompt": record.get("prompt", record.get("messages")),
                        "response": roll.texts[i],
                        "token_ids": roll.tokens[i, start:start + n].tolist(),
                        "logprobs": roll.logprobs[i, start:start + n].tolist(),
                        "finish_reason": roll.finish_reasons[i]})
        tokens = sum(len(r["token_ids"]) for r in out)
        if _replica_lead(topo):  # the progress of every DP replica
            print(f"generate {len(out)}/{len(mine)} prompts{where} | {tokens} tokens | "
                  f"{tokens / (time.perf_counter() - started):,.1f} tok/s", flush=True)
    return gather_records(out, share, topo, len(records))


def main(argv: Optional[Sequence[str]] = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    world = topology.env_world()[2]
    cfg, _ = checked_config(overrides, world)
    try:
        cfg = with_checkpoint_model(cfg)
        dims = validate(cfg, world)
        read_prompts(cfg.generate.prompts)
        if not cfg.generate.out:
            raise ConfigError("generate.out is unset; give generate.out=FILE.jsonl")
    except ValueError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    compat.setup(verbose=cfg.logging.verbose)
    topo = topology.initialize(dims, seed=cfg.seed, timeout_s=cfg.parallel.timeout_s)

    def log(message: str) -> None:
        if topo.rank == 0:
            print(message, flush=True)

    try:
        records = run(cfg, topo, log)
        if records is not None:
            os.makedirs(os.path.dirname(os.path.abspath(cfg.generate.out)), exist_ok=True)
            with open(cfg.generate.out, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            print(f"wrote {len(records)} records to {cfg.generate.out}", flush=True)
    finally:
        topology.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
