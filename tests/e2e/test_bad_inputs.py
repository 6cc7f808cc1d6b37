"""Bad inputs end a run with one message that names the value, the rule and the fix, and lose
nothing already saved.

Config mistakes, missing files among them, are checked in-process through `checked_config` (what
`python -m launch` and `python -m megatron_ext.train` run first: exit 2, one line, no run
directory), and through both entry points for a missing data file. Mistakes inside data files
are checked by calling the data builders. The mistakes that only show at run time (resuming a checkpoint of
another shape, a corrupt or hostile checkpoint, a tokenizer larger than the model's vocab) use
one saved tiny run: a module fixture trains it once (1 process, 2 steps), one spawned process
tries every runtime case against copies of it, and one real `python -m megatron_ext.train`
resumes it with another model shape."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from megatron_ext.config.load import checked_config, compose_config
from megatron_ext.data.dataset import build_rows
from megatron_ext.data.tokenizer import ByteTokenizer, build_tokenizer
from tests.dist._spawn import run_distributed

BASE = ["logging=none", "train.seq_len=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_samples=4", "data.num_samples=64"]
STEP = "step_00000002"

# (id, overrides, world size, what the one line must contain); {tmp} is a folder that exists,
# {good} a valid JSONL file in it
CONFIG_CASES = [
    ("unknown key", ["train.stepz=3"], 1, ["Could not override 'train.stepz'",
                                           "Key 'stepz' not in 'TrainConfig'"]),
    ("unknown group", ["optimizer.lr=1"], 1, ["Could not override 'optimizer.lr'"]),
    ("unknown key appended with +", ["+train.stepz=3"], 1,
     ["unknown config key train.stepz", "would be ignored", "remove it or use one of",
      "steps"]),
    ("unknown top-level key appended with +", ["+foo=1"], 1,
     ["unknown config key foo", "the top level has no such field"]),
    ("wrong type", ["parallel.tp=two"], 2, ["parallel.tp=two", "could not be converted to "
                                           "Integer"]),
    ("unknown preset", ["model=huge"], 1, ["Could not find 'model/huge'", "tiny"]),
    ("world not divisible by tp*pp*cp", ["parallel.tp=2"], 3,
     ["world size 3 is not divisible by parallel.tp*parallel.pp*parallel.cp = 2*1*1 = 2",
      "start a multiple of 2 processes or change the sizes"]),
    ("heads not divisible by tp", ["parallel.tp=8"], 8,
     ["model.num_attention_heads=4 is not divisible by parallel.tp=8", "pick a tp"]),
    ("layers not divisible by pp", ["parallel.pp=3"], 3,
     ["model.num_layers=4 is not divisible by parallel.pp*vpp = 3*1 = 3",
      "change the layer count"]),
    ("vpp without pp", ["parallel.vpp=2"], 1, ["parallel.vpp=2 needs parallel.pp >= 2",
                                               "set parallel.vpp=null"]),
    ("seq_len not divisible by 2*cp", ["parallel.cp=2", "train.seq_len=30"], 2,
     ["train.seq_len=30 is not divisible by 2*parallel.cp = 4", "pad or change seq_len"]),
    ("global batch not divisible", ["train.global_batch_size=6"], 2,
     ["train.global_batch_size=6 is not divisible by train.micro_batch_size*dp = 2*2 = 4",
      "change the batch sizes"]),
    ("sequence parallel without fused norms", ["parallel.tp=2",
                                               "parallel.sequence_parallel=true"], 2,
     ["parallel.sequence_parallel=true needs TransformerEngine", "parallel.sequence_parallel"
                                                                 "=false"]),
    ("bad enum: stage", ["stage=finetune"], 1,
     ["stage='finetune' is not one of pretrain, sft, rl", "pick one"]),
    ("bad enum: dtype", ["model.dtype=fp16"], 1, ["model.dtype='fp16' is not one of fp32, bf16"]),
    ("bad enum: on_malformed", ["data.on_malformed=ignore"], 1,
     ["data.on_malformed='ignore' is not one of error, skip"]),
    ("rl without a starting checkpoint", ["stage=rl"], 1,
     ["rl.init_checkpoint=None is not a checkpoint folder", "give rl.init_checkpoint="]),
    ("unknown nested key appended with +", ["+data.task.ops=3"], 1,
     ["unknown config key data.task.ops", "max_ops"]),
    ("negative seq_len", ["train.seq_len=-4"], 1,
     ["train.seq_len=-4 must be >= 1 (tokens per sample); set it to 1 or more"]),
    ("negative tp", ["parallel.tp=-1"], 1, ["parallel.tp=-1 must be >= 1; set it"]),
    ("zero micro batch", ["train.micro_batch_size=0"], 1,
     ["train.micro_batch_size=0 must be >= 1"]),
    ("zero global batch", ["train.global_batch_size=0"], 1,
     ["train.global_batch_size=0 must be >= 1 (samples per optimizer step)"]),
    ("negative save interval", ["train.save_interval=-1"], 1,
     ["train.save_interval=-1 must be >= 0 (steps between checkpoints; 0: none)"]),
    ("zero log interval", ["train.log_interval=0"], 1, ["train.log_interval=0 must be >= 1"]),
    ("zero timeout", ["parallel.timeout_s=0"], 1, ["parallel.timeout_s=0 must be >= 1"]),
    ("negative kv_channels", ["model.kv_channels=-8"], 1, ["model.kv_channels=-8 must be >= 1"]),
    ("no task samples", ["data.num_samples=0"], 1, ["data.num_samples=0 must be >= 1"]),
    ("negative lr", ["train.lr=-0.1"], 1, ["need 0 <= train.min_lr <= train.lr and lr > 0 "
                                           "(got lr=-0.1", "change train.lr"]),
    ("seq_len beyond RoPE", ["train.seq_len=128", "model.max_position_embeddings=64"], 1,
     ["train.seq_len=128 exceeds model.max_position_embeddings=64", "raise it or shorten"]),
    ("heads not divisible by KV groups", ["model.num_query_groups=3"], 1,
     ["model.num_attention_heads=4 is not divisible by model.num_query_groups=3"]),
    ("resume from a folder that does not exist", ["train.resume=/nonexistent/step_00000002"], 1,
     ["train.resume='/nonexistent/step_00000002' is neither auto, none nor a checkpoint "
      "folder", "give a checkpoints/step_N path"]),
    ("jsonl without a path", ["data=jsonl"], 1,
     ["data.source=jsonl needs data.path=/path/to/train.jsonl"]),
    ("data file does not exist", ["data=jsonl", "data.path={tmp}/missing.jsonl"], 1,
     ["data.path='{tmp}/missing.jsonl' does not exist; give a JSONL file"]),
    ("data path is a folder", ["data=jsonl", "data.path={tmp}"], 1,
     ["data.path='{tmp}' is a folder, not a file"]),
    ("held-out file does not exist", ["data=jsonl", "data.path={good}",
                                      "data.valid_path={tmp}/valid.jsonl"], 1,
     ["data.valid_path='{tmp}/valid.jsonl' does not exist", "data.valid_path=null"]),
    ("tokenizer file does not exist", ["data.tokenizer={tmp}/nope.json"], 1,
     ["data.tokenizer='{tmp}/nope.json' does not exist; give a tokenizer.json path or "
      "data.tokenizer=byte"]),
    ("rl with sequence parallel", ["stage=rl", "rl.init_checkpoint={tmp}", "parallel.tp=2",
                                   "parallel.sequence_parallel=true"], 2,
     ["parallel.sequence_parallel=true: stage=rl generates one token per step",
      "set parallel.sequence_parallel=false"]),
    ("fidelity gate without a reference", ["data=jsonl", "data.path={good}",
                                           "data.fidelity_gate.enabled=true"], 1,
     ["data.fidelity_gate.reference is unset; point it at a JSONL of target-style traces or "
      "set data.fidelity_gate.enabled=false"]),
    ("fidelity gate reference does not exist",
     ["data=jsonl", "data.path={good}", "data.fidelity_gate.enabled=true",
      "data.fidelity_gate.reference={tmp}/reference.jsonl"], 1,
     ["data.fidelity_gate.reference='{tmp}/reference.jsonl' does not exist"]),
    ("fidelity gate threshold above 1", ["data.fidelity_gate.min_dataset_score=1.5"], 1,
     ["data.fidelity_gate.min_dataset_score=1.5 must be <= 1 (a fidelity score, 0..1)"]),
    ("bad enum on an rl field", ["rl.loss_agg=sum"], 1,
     ["rl.loss_agg='sum' is not one of token-mean, seq-mean-token-sum, seq-mean-token-mean",
      "pick one"]),
]
GOOD = json.dumps({"prompt": "Q: 1+1", "response": "A: 2"}) + "\n"


@pytest.mark.parametrize("overrides, world, expected",
                         [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_error_exits_2_with_one_named_line(capsys, tmp_path, overrides, world,
                                                  expected):
    run_dir, good = tmp_path / "run", tmp_path / "good.jsonl"
    good.write_text(GOOD)
    overrides = [o.format(tmp=tmp_path, good=good) for o in overrides]
    with pytest.raises(SystemExit) as exit_:
        checked_config(BASE + overrides + [f"run.dir={run_dir}"], world)
    assert exit_.value.code == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("config error: ")]
    assert len(lines) == 1
    for part in expected:
        assert part.format(tmp=tmp_path) in lines[0]
    assert not run_dir.exists()  # nothing started, nothing written


@pytest.mark.parametrize("entry", [["megatron_ext.train"], ["launch", "local", "--nproc", "2",
                                                            "--"]], ids=["train", "launch"])
def test_missing_data_file_stops_either_entry_point_before_it_starts(tmp_path, entry):
    """As a new user types it: one line, exit 2, no run directory, no traceback, no rank."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", *entry, "data=jsonl",
                           f"data.path={tmp_path}/nonexistent.jsonl", "logging=none",
                           f"run.dir={run_dir}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"config error: data.path='{tmp_path}/nonexistent.jsonl' does not exist; give a JSONL "
        'file of {"prompt", "response"} lines']
    assert proc.stdout == "" and not run_dir.exists()


# -- data -----------------------------------------------------------------------------------


class _BigIdTokenizer(ByteTokenizer):
    """A broken tokenizer that encodes 'x' as an id past its vocab."""

    def encode(self, text):
        return [300 if c == "x" else b for c, b in zip(text, super().encode(text))]


# (id, train file text (None: missing), held-out file text or None, extra overrides, split,
#  tokenizer, what the message must contain; {f} and {v} stand for the two files)
DATA_CASES = [
    ("data file does not exist", None, None, [], "train", None,
     ["data file '{f}' does not exist; check data.path"]),
    ("held-out file does not exist", GOOD, None, [], "heldout", None,
     ["data file '{v}' does not exist; check data.valid_path"]),
    ("broken JSON", GOOD + "{broken\n", None, [], "train", None,
     ["{f}:2: malformed line (Expecting property name", "set data.on_malformed=skip"]),
    ("not an object", GOOD + GOOD + "[1, 2]\n", None, [], "train", None,
     ["{f}:3: malformed line (expected a JSON object, got list)"]),
    ("missing response", json.dumps({"prompt": "Q"}) + "\n", None, [], "train", None,
     ['{f}:1: malformed line (needs string fields "prompt" and "response")']),
    ("prompt not a string", GOOD + json.dumps({"prompt": 7, "response": "A"}) + "\n", None, [],
     "train", None, ["{f}:2: malformed line (needs string fields"]),
    ("invalid UTF-8", GOOD + '{"prompt": "\xff", "response": "A"}\n', None, [], "train", None,
     ["{f}:2: malformed line ('utf-8' codec can't decode"]),
    ("empty file", "\n\n", None, [], "train", None,
     ["the train data '{f}' is empty: it has no non-empty line", "give a file with at least "
                                                                 "one"]),
    ("every line skipped", "{broken\n[1]\n", None, ["data.on_malformed=skip"], "train", None,
     ["the train data '{f}' is empty: all 2 non-empty lines are malformed and "
      "data.on_malformed=skip passed over them"]),
    ("token outside the vocab", GOOD + json.dumps({"prompt": "x", "response": "y"}) + "\n",
     None, [], "train", _BigIdTokenizer(),
     ["'{f}' example 2: token id 300 is outside the tokenizer vocab [0, 259) of "
      "data.tokenizer='byte'", "fix it or use another"]),
]


@pytest.mark.parametrize("text, valid, extra, split, tokenizer, expected",
                         [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_data_error_names_file_line_and_fix(tmp_path, text, valid, extra, split, tokenizer,
                                            expected):
    from megatron_ext.data.examples import DataError
    path, valid_path = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    for p, content in ((path, text), (valid_path, valid)):
        if content is not None:
            p.write_bytes(content.encode("latin-1" if "\xff" in content else "utf-8"))
    cfg = compose_config(BASE + ["data=jsonl", f"data.path={path}",
                                 f"data.valid_path={valid_path}", *extra])
    with pytest.raises(DataError) as err:
        build_rows(cfg, tokenizer or ByteTokenizer(), split)
    for part in expected:
        assert part.format(f=path, v=valid_path) in str(err.value)


def test_tokenizer_file_errors_name_data_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.tokenizer='.*nope.json' does not exist; "
                                                "give a tokenizer.json path"):
        build_tokenizer(str(tmp_path / "nope.json"))
    from tokenizers import Tokenizer, models
    path = tmp_path / "no_eos.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match=r"has no EOS token .*; add one"):
        build_tokenizer(str(path))


# -- at run time: a saved checkpoint --------------------------------------------------------
def _tree_hashes(root):
    return {os.path.relpath(os.path.join(d, f), root):
            hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, names in os.walk(root) for f in names}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished 2-step run with its checkpoint, and the hashes of everything in it."""
    run_dir = str(tmp_path_factory.mktemp("saved") / "run")
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *BASE, "train.steps=2",
                           "train.save_interval=2", f"run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, _tree_hashes(run_dir)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _runtime_case_dirs(saved_run, root):
    """Copies of the saved checkpoint, each spoilt one way; {case: (overrides, marker)}."""
    from megatron_ext.training import checkpoint
    good = os.path.join(saved_run, "checkpoints", STEP)

    def copy(name):
        path = os.path.join(root, name, STEP)
        shutil.copytree(good, path)
        return path

    corrupt = copy("corrupt")
    distcp = sorted(f for f in os.listdir(corrupt) if f.endswith(".distcp"))[0]
    with open(os.path.join(corrupt, distcp), "r+b") as f:
        f.seek(100)
        f.write(b"\x00\xff" * 4)
    unfinished = copy("unfinished")
    os.remove(os.path.join(unfinished, checkpoint.MANIFEST))
    evil_meta, evil_common = copy("evil_metadata"), copy("evil_common")
    markers = {}
    for path, name in ((evil_meta, ".metadata"), (evil_common, "common.pt")):
        markers[path] = os.path.join(root, f"pwned-{os.path.basename(os.path.dirname(path))}")
        with open(os.path.join(path, name), "wb") as f:  # a hostile file, re-manifested
            pickle.dump(_Evil(markers[path]), f)
        checkpoint.write_manifest(path)
    return {
        "corrupt checkpoint": ([f"train.resume={corrupt}"], None),
        "unfinished checkpoint": ([f"train.resume={unfinished}"], None),
        "hostile .metadata pickle": ([f"train.resume={evil_meta}"], markers[evil_meta]),
        "hostile common.pt pickle": ([f"train.resume={evil_common}"], markers[evil_common]),
        "checkpoint of another vocab": ([f"train.resume={good}", "model.vocab_size=300"], None),
        "tokenizer larger than model.vocab_size": (["model.vocab_size=256"], None),
    }


def _runtime_cases(rank, world_size, cases, root, out):
    """In one spawned process: build the training loop for each case and resume; record the
    error."""
    from megatron.core import parallel_state as ps
    from megatron_ext import compat
    from megatron_ext.config.validate import validate
    from parallel import topology

    compat.setup()
    from megatron_ext.train import build_loop

    results = {}
    for name, (overrides, marker) in cases.items():
        cfg = compose_config(BASE + overrides + [f"run.dir={root}/runs/{len(results)}"])
        topo = topology.initialize(validate(cfg, world_size), seed=cfg.seed)
        try:
            build_loop(cfg, topo, cfg.run.dir).resume()
            results[name] = "no error"
        except Exception as err:  # what the run would end with
            results[name] = f"{type(err).__name__}: {err}"
        finally:
            ps.destroy_model_parallel()
        results[name + " marker"] = bool(marker and os.path.exists(marker))
    with open(out, "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def runtime_errors(saved, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("runtime"))
    cases = _runtime_case_dirs(saved[0], root)
    out = os.path.join(root, "results.json")
    run_distributed(_runtime_cases, 1, cases, root, out)
    return json.load(open(out)), cases


RUNTIME_EXPECTED = {
    "corrupt checkpoint": ["CheckpointError: train.resume='{path}' is unusable: file __0_",
                           ".distcp fails its sha256 check",
                           "give a complete checkpoint as train.resume=PATH, or train.resume=none to start over"],
    "unfinished checkpoint": ["CheckpointError: train.resume='{path}' is unusable: no "
                              "manifest.json (the save did not finish)"],
    "hostile .metadata pickle": ["CheckpointError: train.resume='{path}' is unusable: file "
                                 ".metadata references posix.system, which a checkpoint never "
                                 "holds; refusing to unpickle it"],
    "hostile common.pt pickle": ["Weights only load failed"],
    "checkpoint of another vocab": ["CheckpointError: checkpoint {path} is from another model "
                                    "shape: (checkpoint, config) = {{'vocab_size': (259, 300)}}",
                                    "set train.resume=none"],
    "tokenizer larger than model.vocab_size": [
        "ValueError: the tokenizer has 259 tokens but model.vocab_size=256; raise "
        "model.vocab_size or set it to 0 to follow the tokenizer"],
}


@pytest.mark.parametrize("case", list(RUNTIME_EXPECTED))
def test_runtime_error_is_named_and_nothing_runs(runtime_errors, case):
    results, cases = runtime_errors
    overrides, _marker = cases[case]
    path = next((o.split("=", 1)[1] for o in overrides if o.startswith("train.resume=")), "")
    for part in RUNTIME_EXPECTED[case]:
        assert part.format(path=path) in results[case]
    assert results[case + " marker"] is False  # no pickle ran code


def test_resume_with_another_model_shape_fails_and_keeps_the_run(saved, tmp_path):
    """The real entry point, resuming (train.resume=auto) a run directory with another model
    width: it stops with the shape named, and the checkpoint and metrics are untouched."""
    saved_run, _ = saved
    run_dir = str(tmp_path / "run")
    shutil.copytree(saved_run, run_dir)
    before = _tree_hashes(run_dir)
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.train", *BASE, "train.steps=4",
                           "train.save_interval=2", "model.hidden_size=32",
                           f"run.dir={run_dir}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ckpt = os.path.join(run_dir, "checkpoints", STEP)
    assert (f"checkpoint {ckpt} is from another model shape: (checkpoint, config) = "
            "{'hidden_size': (64, 32)}; resume with the model config it was saved with, or set "
            "train.resume=none") in proc.stderr
    after = _tree_hashes(run_dir)
    kept = {k: v for k, v in before.items() if k != "config.yaml"}
    assert {k: after.get(k) for k in kept} == kept  # checkpoints, metrics: byte for byte
    assert set(after) == set(before)


def test_saved_run_is_untouched_by_every_case(saved, runtime_errors):
    run_dir, hashes = saved
    assert _tree_hashes(run_dir) == hashes
