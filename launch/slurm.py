"""`python -m launch slurm [--dry-run] <overrides>`: render an sbatch script from the `cluster`
group and submit it.

The overrides that train locally train here too (`cluster=slurm` is implied when they pick no
cluster group): they are validated for the world the job will have (cluster.nodes x tasks per
node) before anything is submitted, and srun starts
`python -m megatron_ext.train <overrides> run.dir=<dir>` once per task. The run directory is
chosen here, once, and passed explicitly, so every task and every requeue of the job writes to
the same one; the script and SLURM's logs live in it too. Inside the job each task finds its
rank in SLURM's variables (parallel.topology.env_world) and rank 0 on the first node.

Preemption: SLURM sends USR1 to the batch shell cluster.signal_seconds before the time limit,
the shell forwards it to the tasks, the trainer saves a checkpoint and exits with
REQUEUE_EXIT_CODE (75), and the shell requeues the job while SLURM_RESTART_COUNT is below
cluster.max_requeues. The requeued job resumes from the run directory's checkpoints.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

from hydra.errors import HydraException

from megatron_ext.config.load import (REQUEUE_EXIT_CODE, checked_config, compose_config,
                                      run_directory)
from megatron_ext.config.schema import ClusterConfig, Config

TEMPLATE = Path(__file__).parent / "templates" / "sbatch.sh"
REPO = Path(__file__).resolve().parents[1]
SCRIPT_NAME = "sbatch.sh"
_RUN_DIR_OVERRIDE = re.compile(r"^\+{0,2}run\.dir=")


class SlurmConfigError(ValueError):
    """A cluster setting that cannot become an sbatch script; the message names the fix."""


class _Template(string.Template):
    delimiter = "@"  # `$` belongs to bash in the template


def tasks_per_node(cluster: ClusterConfig) -> int:
    """cluster.tasks_per_node when set (CPU clusters), else one task per GPU."""
    return cluster.tasks_per_node or cluster.gpus_per_node


def _directive_value(key: str, value: str) -> str:
    """#SBATCH lines cannot quote: a value with whitespace would be cut there."""
    if re.search(r"\s", value):
        raise SlurmConfigError(f"{key}={value!r} contains whitespace, which an #SBATCH line "
                               "cannot carry; choose a value (or path) without spaces")
    return value


def check_cluster(cluster: ClusterConfig) -> None:
    """Raise SlurmConfigError for the first cluster.* value sbatch could not take."""
    if tasks_per_node(cluster) < 1:
        raise SlurmConfigError(
            f"cluster.tasks_per_node={cluster.tasks_per_node} and cluster.gpus_per_node="
            f"{cluster.gpus_per_node} give no task per node; set cluster.gpus_per_node (one task "
            "per GPU) or cluster.tasks_per_node (CPU processes)")
    for key in ("time", "partition", "account", "qos", "constraint"):
        _directive_value(f"cluster.{key}", getattr(cluster, key) or "")
    for entry in cluster.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", entry):
            raise SlurmConfigError(
                f"cluster.env entry {entry!r} is not KEY=VALUE with a shell variable name; "
                "write it as e.g. NCCL_DEBUG=INFO")


def train_overrides(overrides: Sequence[str], run_dir: str) -> List[str]:
    """The user's overrides with run.dir pinned to the chosen directory."""
    return [o for o in overrides if not _RUN_DIR_OVERRIDE.match(o)] + [f"run.dir={run_dir}"]


def render(cfg: Config, overrides: Sequence[str], run_dir: str, *, python: str,
           workdir: str) -> str:
    """The sbatch script that runs `python -m megatron_ext.train overrides` on cfg.cluster
    (which has passed check_cluster)."""
    c = cfg.cluster
    optional = []
    if c.gpus_per_node > 0:
        optional.append(f"--gpus-per-node={c.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(c, key):
            optional.append(f"--{key}={getattr(c, key)}")
    if c.exclusive:
        optional.append("--exclusive")
    lines = [f"#SBATCH {o}\n" for o in optional]
    lines += [(e if e.startswith("#SBATCH") else f"#SBATCH {e}") + "\n" for e in c.extra_sbatch]
    srun = [f"--ntasks-per-node={tasks_per_node(c)}", f"--cpus-per-task={c.cpus_per_task}"]
    if c.container_image:
        srun += [f"--container-image={c.container_image}", f"--container-workdir={workdir}"]
        if c.container_mounts:
            srun.append(f"--container-mounts={c.container_mounts}")
    exports = "".join(f"export {k}={shlex.quote(v)}\n"
                      for k, v in (e.split("=", 1) for e in c.env))
    command = [python, "-m", "megatron_ext.train", *train_overrides(overrides, run_dir)]
    return _Template(TEMPLATE.read_text()).substitute(
        run_name=_directive_value("run.name", cfg.run.name),
        script=os.path.join(run_dir, SCRIPT_NAME),
        nodes=c.nodes,
        tasks_per_node=tasks_per_node(c),
        cpus_per_task=c.cpus_per_task,
        time=c.time,
        optional_directives="".join(lines),
        workdir=_directive_value("working directory", workdir),
        run_dir=_directive_value("run.dir", run_dir),
        signal=f"B:USR1@{c.signal_seconds}",
        signal_seconds=c.signal_seconds,
        repo=shlex.quote(str(REPO)),
        env_exports=exports,
        requeue_exit_code=REQUEUE_EXIT_CODE,
        max_requeues=c.max_requeues,
        srun_options=" ".join(shlex.quote(s) for s in srun),
        command=" ".join(shlex.quote(s) for s in command),
    )


def submit(script: str) -> str:
    """sbatch the script; return the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError("sbatch is not on PATH; submit from a SLURM login node (or start "
                               "a local cluster: bash scripts/slurm_up.sh), or use --dry-run")
    proc = subprocess.run([sbatch, "--parsable", script], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed with exit code {proc.returncode}: "
                           f"{proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: <id>[;<cluster>]


def run_slurm(overrides: Sequence[str], *, dry_run: bool = False, python: str = "") -> int:
    """Validate, render, and (unless dry_run) write the script into the run directory and
    submit it. Config mistakes exit 2 with one line, as `launch local` does."""
    overrides = list(overrides)
    if not any(o.startswith("cluster=") for o in overrides):
        overrides.insert(0, "cluster=slurm")
    try:
        cluster = compose_config(overrides).cluster
        check_cluster(cluster)
    except SlurmConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except (HydraException, ValueError):
        cluster = None  # checked_config reports it below, in its own words
    world = cluster.nodes * tasks_per_node(cluster) if cluster else 1
    # the login node cannot say whether TE/apex norms import on the compute nodes
    cfg, _dims = checked_config(overrides, world, have_fused_norms=None)
    run_dir = run_directory(cfg)
    python = python or ("python" if cfg.cluster.container_image else sys.executable)
    try:
        script = render(cfg, overrides, run_dir, python=python, workdir=os.getcwd())
    except SlurmConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    if dry_run:
        print(script, end="")
        return 0
    path = os.path.join(run_dir, SCRIPT_NAME)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    try:
        job = submit(path)
    except RuntimeError as err:
        print(f"launch: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"job id: {job}\nscript: {path}\nlog: {run_dir}/slurm-{job}.out "
          f"(errors: slurm-{job}.err)\nrun directory: {run_dir}", flush=True)
    return 0
