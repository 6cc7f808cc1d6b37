"""`python tests/e2e/hf_logits.py CHECKPOINT IDS.pt OUT.pt`: our megatron model's logits for the
token ids in IDS.pt, from a checkpoint (loaded and resharded into one process), padding cut."""
import sys

import torch


def main(checkpoint: str, ids_path: str, out_path: str) -> None:
    from megatron_ext.convert.export import _single_process_model, checkpoint_model_fields
    from megatron_ext.training.checkpoint import (CheckpointManager, ModelPart, model_shape,
                                                  read_train_state)
    state = read_train_state(checkpoint)
    cfg, topo, chunks = _single_process_model(checkpoint_model_fields(state))
    vocab = state["shape"]["vocab_size"]
    CheckpointManager("/nonexistent", topo, keep=1, sharded={"model": ModelPart(chunks)},
                      states={}, shape=model_shape(cfg.model, vocab, chunks),
                      log=print).load(checkpoint, only=("model",))
    ids = torch.load(ids_path)
    model = chunks[0].eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None)
    torch.save(logits[..., :vocab], out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
