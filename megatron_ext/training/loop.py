"""The training loop every recipe runs in: resume, the step, progress and metrics, the NaN
policy, the save cadence, preemption and the eval cadence, asked in that order after each step.

A recipe (SFT, RL) supplies the work: `units` (the ModelUnits it trains, for checkpoints),
`states()` (its JSON-able stateful parts), `start(resumed)`, `train_step(step) -> record`,
`evaluate(step) -> record`, `progress(record) -> str` (the step's progress-line suffix) and
`eval_hooks`, each called as `hook(eval record, loop)` (the regression guard is one: it may save
through the loop's checkpoints, and returns "restored" when it put other weights in place,
"stop" to end the run)."""
from __future__ import annotations

import os
import signal
import time
from typing import Dict, Optional, Protocol

import torch.distributed as dist

from megatron_ext.logging.nvml import GpuMonitor
from megatron_ext.logging.wandb_logger import build_logger
from megatron_ext.training.checkpoint import (CheckpointManager, ModelPart, OptimizerPart,
                                              read_train_state)
from megatron_ext.training.metrics import MetricsWriter, progress_line
from megatron_ext.config.load import REQUEUE_EXIT_CODE
from megatron_ext.training.preemption import PreemptionFlag
from parallel.topology import Topology


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf for too many steps in a row."""


class Recipe(Protocol):
    units: Dict  # name -> ModelUnit: the sharded parts of a checkpoint
    eval_interval: int  # steps between evals (0: only at the end)
    eval_at_start: bool  # evaluate the starting weights before the first step
    eval_hooks: list  # fn(eval record, loop) -> None | "restored" | "stop"
    shape: Dict  # the model shape its checkpoints record

    def states(self) -> Dict: ...
    def start(self, resumed: bool, checkpoints: CheckpointManager) -> None: ...
    def train_step(self, step: int) -> Dict: ...
    def evaluate(self, step: int) -> Optional[Dict]: ...
    def progress(self, record: Dict) -> str: ...


def checkpoint_parts(units: Dict) -> Dict:
    """The sharded parts of a checkpoint: each unit's weights under its key ("model" for the
    trained policy, so any run can start from any other's weights) and its optimizer state."""
    parts = {}
    for key, unit in units.items():
        model = ModelPart(unit.chunks, prefix="" if key == "model" else f"{key}.")
        parts[key] = model
        if unit.optimizer is not None:
            name = "optimizer" if key == "model" else f"{key}_optimizer"
            parts[name] = OptimizerPart(unit.optimizer, model)
    return parts


class Every:
    """A cadence: due at every multiple of `interval` (never when it is 0)."""

    def __init__(self, interval: int):
        self.interval = interval

    def __call__(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0


class TrainLoop:
    def __init__(self, cfg, topo: Topology, run_dir: str, recipe: Recipe):
        self.preemption = PreemptionFlag().install()  # early: USR1 before it would kill us
        self.cfg, self.topo, self.run_dir, self.recipe = cfg, topo, run_dir, recipe
        t = cfg.train
        self.steps = t.steps
        self.should_log, self.should_save = Every(t.log_interval), Every(t.save_interval)
        self.should_eval = Every(recipe.eval_interval)
        self.step = 0
        self.skipped_steps = 0  # non-finite steps skipped in total
        self.bad_in_a_row = 0
        self.last_eval: Optional[Dict] = None
        self.checkpoints = CheckpointManager(
            os.path.join(run_dir, "checkpoints"), topo, keep=t.keep_checkpoints,
            sharded=checkpoint_parts(recipe.units), states={"loop": self, **recipe.states()},
            shape=recipe.shape, log=self.log, async_save=t.async_save)
        self.metrics = MetricsWriter(run_dir, topo.is_logging_rank)
        self.logger = build_logger(cfg, run_dir, topo.is_logging_rank)
        self.gpu = GpuMonitor(cfg.logging.nvml_interval, topo.local_rank, run_dir, log=self.log)

    # -- what a checkpoint keeps of the loop ------------------------------------------------
    def state_dict(self) -> Dict:
        return {"step": self.step, "skipped_steps": self.skipped_steps, "run_dir": self.run_dir}

    def load_state_dict(self, state: Dict) -> None:
        self.step, self.skipped_steps = state["step"], state["skipped_steps"]

    # -- output -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.topo.is_logging_rank:
            print(message, flush=True)

    def record(self, rec: Dict) -> None:
        self.metrics.write(rec)
        self.logger.log(rec)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> Dict:
        """Train to `train.steps` (or until a hook stops the run); the last eval record."""
        self.resume()
        if self.step == 0 and self.recipe.eval_at_start and self.evaluate() == "stop":
            return self.finish()
        first_step, started = self.step, time.perf_counter()
        while self.step < self.steps:
            self.step += 1
            begin = time.perf_counter()
            rec = self.recipe.train_step(self.step)
            applied = rec.pop("applied")
            self.count_skips(applied)
            self.report(rec, begin, (time.perf_counter() - started) / (self.step - first_step))
            if not applied:
                self.stop_if_diverged(rec)
            self.checkpoints.finish(wait=False)
            if self.should_save(self.step):
                self.save(background=True)
            self.check_preemption()
            if self.should_eval(self.step) and self.evaluate() == "stop":
                break
        return self.finish()

    def resume(self) -> None:
        path = self.checkpoints.resume_path(self.cfg.train.resume)
        if path is not None and read_train_state(path).get("origin", {}).get("imported"):
            # `convert import` wrote weights only: start step 0 from them
            self.checkpoints.load(path, only=("model",))
            for unit in self.recipe.units.values():
                if unit.optimizer is not None:
                    unit.optimizer.reload_model_params()
            self.log(f"initialised from the imported checkpoint {path} (weights only)")
            path = None
        if path is not None:
            self.checkpoints.load(path)
            self.log(f"resumed from {path} at step {self.step}")
        self.metrics.truncate_after(self.step)  # a restart logs the later steps again, once
        self.recipe.start(resumed=path is not None, checkpoints=self.checkpoints)

    def report(self, rec: Dict, begin: float, per_step_s: float) -> None:
        """The step's metrics record and its one progress line."""
        elapsed = time.perf_counter() - begin
        tokens = rec.pop("tokens")
        rec = {"step": self.step, **rec, "tokens_per_s": tokens / elapsed,
               "step_time_s": elapsed, "skipped_steps": self.skipped_steps}
        gpu = self.gpu.maybe_sample(self.step)
        if gpu and self.topo.is_logging_rank:
            self.logger.log({"step": self.step, **gpu})
        if self.should_log(self.step) or self.step == self.steps:
            self.record(rec)
            self.log(progress_line(rec, self.steps, per_step_s * (self.steps - self.step))
                     + self.recipe.progress(rec))

    def save(self, tag: Optional[str] = None, background: bool = False) -> str:
        return self.checkpoints.save(self.step, tag=tag, background=background)

    def count_skips(self, applied: bool) -> None:
        self.bad_in_a_row = 0 if applied else self.bad_in_a_row + 1
        self.skipped_steps += not applied

    def stop_if_diverged(self, rec: Dict) -> None:
        """The NaN policy: a skipped (non-finite) update is reported; `train.max_bad_steps` in
        a row save the state for inspection and stop the run."""
        self.log(f"step {self.step}: loss {rec['loss']} / grad-norm {rec['grad_norm']} is not "
                 f"finite; update skipped ({self.bad_in_a_row} in a row)")
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            path = self.save(tag="bad-state")
            raise NonFiniteLossError(
                f"loss or grad norm was NaN/Inf for {self.bad_in_a_row} steps in a row, up to "
                f"step {self.step}; the state is saved in {path} for inspection. Lower "
                "train.lr, check the data, or resume from the last good checkpoint")

    def check_preemption(self) -> None:
        """USR1 (SLURM's warning before preemption or the time limit): save and exit with the
        code the sbatch script requeues on. SIGTERM (scancel, node failure): save and fail.
        Every rank asks at the same point, so all take the same exit."""
        signum = self.preemption.signal_anywhere(dist.group.WORLD)
        if not signum:
            return
        self.checkpoints.finish()
        if self.checkpoints.last_saved_step != self.step:
            self.save()
        self.logger.finish()
        requeue = signum == signal.SIGUSR1
        self.log(f"stopping at step {self.step} on {signal.Signals(signum).name}"
                 f"{': exiting for requeue' if requeue else ''}")
        dist.barrier(group=dist.group.WORLD)
        raise SystemExit(REQUEUE_EXIT_CODE if requeue else 128 + signum)

    def evaluate(self) -> Optional[str]:
        """Evaluate, record, and run the eval hooks; "stop" when one of them ends the run."""
        rec = self.recipe.evaluate(self.step)
        if rec is None:
            return None
        self.record(rec)
        self.last_eval = rec
        for hook in self.recipe.eval_hooks:
            verdict = hook(rec, self)
            if verdict is not None:
                self.last_eval = None  # other weights now: the record no longer describes them
            if verdict == "stop":
                return "stop"
        return None

    def finish(self) -> Dict:
        """The last save (none for train.steps=0: nothing trained) and the final eval (unless
        this step's is already done)."""
        if (self.steps and self.cfg.train.save_interval
                and self.checkpoints.last_saved_step != self.step):
            self.save()
        self.checkpoints.finish()
        if self.last_eval is None or self.last_eval["step"] != self.step:
            rec = self.recipe.evaluate(self.step)
            if rec is not None:
                self.record(rec)
                self.last_eval = rec
        self.logger.finish()
        if self.topo.is_logging_rank:  # matplotlib loads here, on one rank, once
            from megatron_ext.logging.plots import write_plots
            self.log(f"plots: {len(write_plots(self.run_dir))} curves in {self.run_dir}/plots")
        return self.last_eval or {}
