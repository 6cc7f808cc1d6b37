"""What a run shows a person: one `fallbacks:` line instead of megatron's and torch's warnings
(which `logging.verbose=true` brings back), and the plots written when it ends."""
import os
import subprocess
import sys

import torch

WARNING_KINDS = ("UserWarning", "DeprecationWarning", "FutureWarning")


def _run(tmp_path, *extra):
    run_dir = tmp_path / "run"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_ext.train", "model=tiny", "train.steps=2",
         "train.eval_samples=2", "logging=none", f"run.dir={run_dir}", *extra],
        capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, (proc.stdout + proc.stderr).splitlines()


def test_a_run_names_its_fallbacks_once_and_shows_no_warnings(tmp_path):
    run_dir, lines = _run(tmp_path)
    assert [l for l in lines if any(kind in l for kind in WARNING_KINDS)] == []
    fallbacks = [l for l in lines if l.startswith("fallbacks: ")]
    assert len(fallbacks) == 1 and sum("fallbacks:" in l for l in lines) == 1
    if not torch.cuda.is_available():
        assert fallbacks[0].startswith("fallbacks: no TransformerEngine/apex (megatron local "
                                       "layer spec"), fallbacks[0]
        assert "CPU bridge for megatron-core" in fallbacks[0]
        assert "no NVML" in fallbacks[0]
        assert not any(l.startswith("NVML unavailable") for l in lines)  # said once, above
    assert f"plots: 6 curves in {run_dir}/plots" in lines
    assert sorted(os.listdir(run_dir / "plots")) == sorted(
        f"{n}.png" for n in ("loss", "heldout_loss", "lr", "grad_norm", "tokens_per_s",
                             "accuracy"))


def test_verbose_shows_the_megatron_warnings(tmp_path):
    _, lines = _run(tmp_path, "logging.verbose=true")
    shown = [l for l in lines if "UserWarning" in l and "/megatron/core/" in l]
    # megatron's own TransformerConfig default trips its deprecation on every machine
    assert any("full scope is deprecated" in l for l in shown), lines
    if not torch.cuda.is_available():
        assert any("Transformer Engine and Apex are not installed" in l for l in shown)
    assert sum(l.startswith("fallbacks: ") for l in lines) == 1
