"""HF import and export of a `1b`-shaped random Llama (hidden 2048, FFN 8192, 32 heads / 8 KV
groups, vocab 128256, tied) on CPU, fp32: wall time and peak RSS of `convert import` and
`convert export` (one process each; export streams the checkpoint, so its peak should be about
the largest tensor, far below the model), and the peak RSS of each rank of a TP2 x PP2 load
straight from the HF folder (convert/hf_load.py) against that rank's shard size.

  python -m benchmarks.hf_convert                        # the 1b shape, 16 layers
  python -m benchmarks.hf_convert --layers 4 --hidden 1024 --ffn 4096 --vocab 32000

Goal: a rank's RSS growth over its start, at its peak during the weight load, <= its shard + the
largest single HF tensor + 20%; a loader that reads whole files or whole tensors per rank
holds far more. The same goal for export, whose "shard" is the one tensor it holds. The random
weights are written tensor by tensor with safetensors (no transformers model is built), so the
benchmark itself never holds the whole model."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import torch

from tests.dist._spawn import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """The highest RSS of this process while the `with` block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.peak, self._stop = _rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def write_random_llama(path: str, a):
    """A random LlamaForCausalLM folder of the given shape; returns (its largest tensor's
    bytes, all its bytes)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from megatron_ext.convert.byte_tokenizer import save_byte_tokenizer
    from megatron_ext.convert.mapping import hf_names
    head = a.hidden // a.heads
    config = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.ffn,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads,
                         num_key_value_heads=a.groups, tie_word_embeddings=True,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 500000.0})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    save_byte_tokenizer(path)
    shapes = {"embed_tokens": [a.vocab, a.hidden], "norm": [a.hidden], "layernorm": [a.hidden],
              "q_proj": [a.heads * head, a.hidden], "k_proj": [a.groups * head, a.hidden],
              "v_proj": [a.groups * head, a.hidden], "o_proj": [a.hidden, a.heads * head],
              "gate_proj": [a.ffn, a.hidden], "up_proj": [a.ffn, a.hidden],
              "down_proj": [a.hidden, a.ffn]}
    names = list(hf_names("LlamaForCausalLM", True, a.layers))
    weight_map, largest, total = {}, 0, 0
    generator = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        kind = next(k for k in shapes if f"{k}." in name or name.endswith(f"{k}.weight"))
        tensor = torch.randn(shapes[kind], generator=generator) * 0.02
        file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({name: tensor}, os.path.join(path, file), metadata={"format": "pt"})
        weight_map[name] = file
        largest = max(largest, tensor.numel() * 4)
        total += tensor.numel() * 4
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return largest, total


def _load_ranks(rank: int, world_size: int, hf_dir: str, out: str) -> None:
    from megatron.core import parallel_state as ps

    from megatron_ext import compat
    from megatron_ext.config.load import compose_config
    from megatron_ext.config.validate import validate
    from parallel import topology
    compat.setup()
    from megatron_ext.convert.hf_load import load_hf_weights
    from megatron_ext.models.gpt import build_gpt_chunks
    cfg = compose_config(["logging=none", "model=hf", f"model.hf_path={hf_dir}", "parallel.tp=2",
                          "parallel.pp=2", "train.seq_len=64", "train.global_batch_size=4",
                          "train.micro_batch_size=4"])
    topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
    start = _rss()
    with PeakRSS() as build:
        chunks = build_gpt_chunks(cfg, topo, cfg.model.vocab_size, init=False)
    built = _rss()
    with PeakRSS() as load:
        began = time.perf_counter()
        load_hf_weights(chunks, hf_dir, topo, cfg.model.vocab_size)
        load_s = time.perf_counter() - began
    shard = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "shard": shard, "after_build": built - start,
                   "build_peak": build.peak - start, "growth": load.peak - start,
                   "load_extra": load.peak - built, "load_s": load_s}, f)
    ps.destroy_model_parallel()


# One `python -m megatron_ext.convert` command: its wall time and RSS peak over its start, both
# once the modules are imported (VmHWM reset through /proc/self/clear_refs).
_CONVERT = """
import json, sys, time
from megatron_ext.convert.__main__ import main
import megatron_ext.convert.export, megatron_ext.models.gpt, safetensors.torch  # noqa

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before, began = status("VmRSS:"), time.perf_counter()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "s": time.perf_counter() - began,
                  "growth": status("VmHWM:") - before}))
"""


def measured_convert(*args):
    """(seconds, peak RSS growth in bytes) of one convert command."""
    r = subprocess.run([sys.executable, "-c", _CONVERT, *args], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True)
    result = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"code": 1}
    if result["code"]:
        raise SystemExit(r.stderr[-3000:])
    return result["s"], result["growth"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="hf_convert_")
    try:
        hf = os.path.join(tmp, "hf")
        largest, total = write_random_llama(hf, a)
        run_distributed(_load_ranks, 4, hf, tmp, timeout_s=3600)
        import_s, import_peak = measured_convert("import", "--hf", hf, "--out", os.path.join(tmp, "ckpt"))
        export_s, export_peak = measured_convert("export", "--checkpoint", os.path.join(tmp, "ckpt"),
                                         "--out", os.path.join(tmp, "out"))
        mib = 2 ** 20
        print(f"shape: {a.layers} layers, hidden {a.hidden}, ffn {a.ffn}, heads {a.heads}/"
              f"{a.groups}, vocab {a.vocab}, tied, fp32; model {total / mib:.0f} MiB, largest "
              f"tensor {largest / mib:.0f} MiB")
        print("| command (1 process) | wall s | peak RSS growth MiB | vs model |")
        print("|---|---|---|---|")
        for name, seconds, peak in (("convert import", import_s, import_peak),
                                    ("convert export", export_s, export_peak)):
            print(f"| {name} | {seconds:.1f} | {peak / mib:.0f} | {peak / total:.2f} |")
        print(f"export goal (largest tensor + 20%): {largest * 1.2 / mib:.0f} MiB, "
              f"{'met' if export_peak <= largest * 1.2 else 'not met'}")
        print("| rank | shard MiB | RSS after build | build peak | peak in load | load's own extra "
              "| goal (shard + largest + 20%) | load met | load s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for rank in range(4):
            r = json.load(open(os.path.join(tmp, f"rank{rank}.json")))
            goal = (r["shard"] + largest) * 1.2
            met = r["growth"] <= goal
            print(f"| {rank} | {r['shard'] / mib:.0f} | {r['after_build'] / mib:.0f} | "
                  f"{r['build_peak'] / mib:.0f} | {r['growth'] / mib:.0f} | "
                  f"{r['load_extra'] / mib:.0f} | {goal / mib:.0f} | {'yes' if met else 'no'} | "
                  f"{r['load_s']:.1f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
