"""Config composition and validation: every rule names its fields, typos fail early, and the
config package is the leaf that the launcher alone depends on."""
import ast
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from megatron_ext.config.fields import bounded, check_fields, one_of
from megatron_ext.config.layout import LayoutError
from megatron_ext.config.load import compose_config, run_directory
from megatron_ext.config.validate import ConfigError, validate

REPO = pathlib.Path(__file__).resolve().parents[2]


def _check(overrides, world_size=1):
    return validate(compose_config(overrides), world_size)


def test_defaults_compose_and_validate():
    cfg = compose_config([])
    assert (cfg.model.name, cfg.stage, cfg.parallel.tp) == ("tiny", "sft", 1)
    assert _check(["parallel.tp=2", "parallel.pp=2"], 8).dp == 2


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp*parallel.pp*parallel.cp = 2*1*1 = 2"),
    (["parallel.tp=8", "model.num_attention_heads=12", "model.num_query_groups=4",
      "model.hidden_size=96"], 8, "model.num_attention_heads=12 is not divisible by parallel.tp=8"),
    (["parallel.tp=4", "model.num_attention_heads=4", "model.num_query_groups=2"], 4,
     "model.num_query_groups=2 is not divisible by parallel.tp=4"),
    (["parallel.pp=2", "parallel.vpp=2", "model.num_layers=6"], 2,
     "model.num_layers=6 is not divisible by parallel.pp*vpp = 2*2 = 4"),
    (["parallel.pp=3"], 3, "model.num_layers=4 is not divisible by parallel.pp*vpp = 3*1 = 3"),
    (["parallel.cp=2", "train.seq_len=30"], 2, "train.seq_len=30 is not divisible by 2*parallel.cp = 4"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1,
     "train.global_batch_size=10 is not divisible by train.micro_batch_size*dp = 4*1 = 4"),
    (["train.global_batch_size=8", "train.micro_batch_size=2"], 3,
     "train.global_batch_size=8 is not divisible by train.micro_batch_size*dp = 2*3 = 6"),
    (["parallel.tp=2", "parallel.sequence_parallel=true"], 2,
     "parallel.sequence_parallel=true needs TransformerEngine or NVIDIA apex"),
    (["parallel.vpp=2"], 1, "parallel.vpp=2 needs parallel.pp >= 2"),
])
def test_layout_rules(overrides, world, message):
    with pytest.raises(LayoutError) as err:
        _check(overrides, world)
    assert message in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["stage=finetune"], "stage='finetune' is not one of pretrain, sft, rl"),
    (["train.recompute=some"], "train.recompute='some' is not one of none, selective, full"),
    (["model.num_attention_heads=6", "model.num_query_groups=4", "model.hidden_size=96"],
     "model.num_attention_heads=6 is not divisible by model.num_query_groups=4"),
    (["model.hidden_size=66"], "model.hidden_size=66 is not divisible by model.num_attention_heads=4"),
    (["train.seq_len=128", "model.max_position_embeddings=64"],
     "train.seq_len=128 exceeds model.max_position_embeddings=64"),
    (["train.min_lr=1.0", "train.lr=0.1"], "need 0 <= train.min_lr <= train.lr"),
    (["train.steps=-1"], "train.steps=-1 must be >= 0"),
    (["rl.kl_mode=bogus"], "rl.kl_mode='bogus' is not one of loss, reward; pick one of these"),
    (["rl.ppo_epochs=0"], "rl.ppo_epochs=0 must be >= 1; set it to 1 or more"),
    (["cluster.cpus_per_task=0"], "cluster.cpus_per_task=0 must be >= 1"),
    (["data.tokenizer=/no/such/tokenizer.json"],
     "data.tokenizer='/no/such/tokenizer.json' does not exist; give a tokenizer.json path"),
    (["data=jsonl", "data.path=/no/such/train.jsonl"],
     "data.path='/no/such/train.jsonl' does not exist; give a JSONL file"),
    (["data.fidelity_gate.enabled=true"], "data.fidelity_gate checks JSONL SFT data"),
])
def test_value_rules(overrides, message):
    with pytest.raises(ConfigError) as err:
        _check(overrides)
    assert message in str(err.value)


@pytest.mark.parametrize("override, key", [("parallel.tpp=2", "parallel.tpp"),
                                           ("train.stepz=3", "train.stepz"),
                                           ("parallel.tp=two", "parallel.tp")])
def test_override_typo_is_refused(override, key):
    with pytest.raises(ConfigCompositionException) as err:
        compose_config([override])
    assert key in str(err.value)


def test_typo_fails_before_any_process_starts(tmp_path):
    """The launcher validates first: exit 2 with the key named, no run directory made."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "local", "--nproc", "2", "--", "parallel.tpp=2",
         f"run.dir={run_dir}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: Could not override 'parallel.tpp'" in proc.stderr
    assert not run_dir.exists()


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "Q: 1+1", "response": "A: 2"}) + "\n")
    return ["data=jsonl", f"data.path={path}"]


@pytest.mark.parametrize("overrides, message", [
    (["data.path={tmp}"], "data.path='{tmp}' is a folder, not a file"),
    (["data.valid_path={tmp}/valid.jsonl"], "data.valid_path='{tmp}/valid.jsonl' does not exist; "
                                            "give a held-out JSONL file"),
    # the fidelity gate's own settings, checked before any process (they were checked on rank 0
    # after the process groups and the run directory existed)
    (["data.fidelity_gate.enabled=true"], "data.fidelity_gate.reference is unset; point it at a "
                                          "JSONL of target-style traces"),
    (["data.fidelity_gate.enabled=true", "data.fidelity_gate.reference={tmp}/ref.jsonl"],
     "data.fidelity_gate.reference='{tmp}/ref.jsonl' does not exist"),
    (["data.fidelity_gate.min_trace_score=1.5"],
     "data.fidelity_gate.min_trace_score=1.5 must be <= 1 (a fidelity score, 0..1)"),
    (["data.fidelity_gate.action=stop"],
     "data.fidelity_gate.action='stop' is not one of filter, warn, fail"),
])
def test_data_files_and_gate_rules(tmp_path, jsonl, overrides, message):
    with pytest.raises(ConfigError) as err:
        _check(jsonl + [o.format(tmp=tmp_path) for o in overrides])
    assert message.format(tmp=tmp_path) in str(err.value)


def test_a_good_jsonl_run_with_a_gate_passes(tmp_path, jsonl):
    ref = tmp_path / "ref.jsonl"
    ref.write_text("")
    _check(jsonl + [f"data.valid_path={jsonl[1].split('=', 1)[1]}",
                    "data.fidelity_gate.enabled=true", f"data.fidelity_gate.reference={ref}"])


def test_field_metadata_is_walked_through_nested_sections_and_lists():
    """Choices and bounds are read off the fields, in lists of sections too; None passes an
    optional bound."""
    @dataclasses.dataclass
    class Leaf:
        kind: str = one_of("a", "b")  # a or b
        size: int = bounded(1, at_least=1, at_most=4, what="a size")  # 1..4
        limit: object = bounded(None, at_least=0)  # optional

    @dataclasses.dataclass
    class Root:
        leaves: list = dataclasses.field(default_factory=lambda: [Leaf(), Leaf()])  # leaves

    check_fields(Root(), "root.")
    for leaf, message in [(Leaf(kind="c"), "root.leaves[1].kind='c' is not one of a, b"),
                          (Leaf(size=5), "root.leaves[1].size=5 must be <= 4 (a size); set it "
                                         "to 4 or less"),
                          (Leaf(limit=-1), "root.leaves[1].limit=-1 must be >= 0")]:
        with pytest.raises(ConfigError) as err:
            check_fields(Root(leaves=[Leaf(), leaf]), "root.")
        assert message in str(err.value)


def test_every_choice_of_the_schema_is_on_its_field():
    """The choices users type are field metadata, and each default is one of its choices."""
    from megatron_ext.config.schema import Config
    seen = {}

    def walk(node, prefix=""):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if "choices" in f.metadata:
                seen[prefix + f.name] = f.metadata["choices"]
                assert value in f.metadata["choices"]
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
    walk(Config())
    assert seen["stage"] == ("pretrain", "sft", "rl")
    assert seen["rl.algorithm"] == ("grpo", "ppo")
    assert seen["data.fidelity_gate.action"] == ("filter", "warn", "fail")


def test_run_directory_is_run_dir_or_a_timestamped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_directory(compose_config(["run.dir=rel/run"])) == str(tmp_path / "rel" / "run")
    name = run_directory(compose_config(["run.name=demo"]))
    assert re.fullmatch(re.escape(str(tmp_path / "outputs")) + r"/demo-\d{8}-\d{6}", name)
    assert not (tmp_path / "outputs").exists()  # naming creates nothing


def _imported_modules(code):
    proc = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(sorted(sys.modules))"],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    return eval(proc.stdout)


def test_config_is_the_leaf_of_the_package():
    """Importing every config module pulls in nothing else of megatron_ext, nor parallel/,
    torch or megatron: the launcher validates without them."""
    mods = _imported_modules("import megatron_ext.config.load, megatron_ext.config.validate")
    ours = [m for m in mods if m.split(".")[0] in ("megatron_ext", "parallel")]
    assert ours and all(m in ("megatron_ext", "megatron_ext.config") or
                        m.startswith("megatron_ext.config.") for m in ours), ours
    assert not [m for m in mods if m.split(".")[0] in ("torch", "megatron")]


def test_launch_imports_only_the_config_of_megatron_ext():
    imported = set()
    for path in (REPO / "launch").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
    ours = {m for m in imported if m.split(".")[0] in ("megatron_ext", "parallel")}
    assert ours and all(m.startswith("megatron_ext.config.") for m in ours), ours
    mods = _imported_modules("import launch.__main__, launch.local, launch.slurm")
    assert not [m for m in mods if m.split(".")[0] in ("torch", "megatron", "parallel")]
