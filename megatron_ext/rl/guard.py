"""The regression guard: RL can make a policy worse while its reward rises (reward hacking,
entropy collapse, a bad batch), so held-out accuracy is checked every `rl.eval_interval` steps;
a drop of more than `rl.margin` below the best seen restores the best weights and optimizer
state and halves the LR, or stops the run (`rl.action`).

It is an eval hook of the training loop and owns its state: called with each eval record, it
saves a new best as a tagged checkpoint and restores the model parts (never the loop's or the
data's state: the step, schedule and pass-rate history go on) from it."""
from __future__ import annotations

import shutil
from typing import Dict, Optional


class RegressionGuard:
    def __init__(self, margin: float, action: str, policy, lr: float, min_lr: float):
        self.margin, self.action = margin, action
        self.policy, self.lr, self.min_lr = policy, lr, min_lr
        self.best_accuracy: Optional[float] = None
        self.best_step: Optional[int] = None
        self.best_path: Optional[str] = None
        self.lr_scale = 1.0  # product of the halvings so far
        self.restores = 0

    def judge(self, accuracy: float) -> str:
        """"best" (a new best: save it), "ok", or "regressed" (restore the best)."""
        if self.best_accuracy is None or accuracy > self.best_accuracy:
            return "best"
        if accuracy < self.best_accuracy - self.margin:
            return "regressed"
        return "ok"

    def __call__(self, rec: Dict, loop) -> Optional[str]:
        verdict = self.judge(rec["accuracy"])
        if verdict == "best":
            self._keep_best(rec, loop)
        elif verdict == "regressed":
            return self._restore(rec, loop)
        return None

    def _keep_best(self, rec: Dict, loop) -> None:
        previous = self.best_path
        self.best_accuracy, self.best_step = rec["accuracy"], loop.step
        self.best_path = loop.save(tag="best")
        if previous and previous != self.best_path and loop.topo.rank == 0:
            shutil.rmtree(previous, ignore_errors=True)  # only the newest best is kept

    def _restore(self, rec: Dict, loop) -> str:
        loop.checkpoints.load(self.best_path, only=tuple(loop.checkpoints.sharded))
        self.restores += 1
        if self.action == "halve_lr":
            self.lr_scale *= 0.5
            self.apply_lr_scale()
        loop.record({"step": loop.step, "split": "guard", "accuracy": rec["accuracy"],
                     "best_accuracy": self.best_accuracy, "best_step": self.best_step,
                     "action": self.action, "lr_scale": self.lr_scale, "restores": self.restores})
        loop.log(f"guard step {loop.step:>5} | held-out accuracy {rec['accuracy']:.1%} fell more "
                 f"than {self.margin:.1%} below the best {self.best_accuracy:.1%} (step "
                 f"{self.best_step}): restored that checkpoint"
                 + (f", LR scale now {self.lr_scale:g}" if self.action == "halve_lr"
                    else "; stopping (rl.action=stop)"))
        return "stop" if self.action == "stop" else "restored"

    def apply_lr_scale(self) -> None:
        self.policy.scale_lr(self.lr_scale, self.lr, self.min_lr)

    def state_dict(self) -> Dict:
        return {"best_accuracy": self.best_accuracy, "best_step": self.best_step,
                "best_path": self.best_path, "lr_scale": self.lr_scale,
                "restores": self.restores}

    def load_state_dict(self, state: Dict) -> None:
        self.best_accuracy, self.best_step = state["best_accuracy"], state["best_step"]
        self.best_path, self.lr_scale = state["best_path"], state["lr_scale"]
        self.restores = state["restores"]
        self.apply_lr_scale()
