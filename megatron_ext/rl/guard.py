"""The regression guard: RL can make a policy worse while its reward rises (reward hacking,
entropy collapse, a bad batch), so held-out accuracy is checked every `rl.eval_interval` steps;
a drop of more than `rl.margin` below the best seen restores the best weights and halves the LR,
or stops the run (`rl.action`)."""
from __future__ import annotations

from typing import Dict, Optional


class RegressionGuard:
    def __init__(self, margin: float, action: str):
        self.margin, self.action = margin, action
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

    def state_dict(self) -> Dict:
        return {"best_accuracy": self.best_accuracy, "best_step": self.best_step,
                "best_path": self.best_path, "lr_scale": self.lr_scale,
                "restores": self.restores}

    def load_state_dict(self, state: Dict) -> None:
        self.best_accuracy, self.best_step = state["best_accuracy"], state["best_step"]
        self.best_path, self.lr_scale = state["best_path"], state["lr_scale"]
        self.restores = state["restores"]
