"""metrics.jsonl and the progress line."""
from __future__ import annotations

import json
import math
import os
from typing import Dict


class MetricsWriter:
    """Appends one JSON object per record to run_dir/metrics.jsonl (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step`: a resumed run logs them again, once."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(rec: Dict, total_steps: int, eta_s: float) -> str:
    return (f"step {rec['step']:>5}/{total_steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e}"
            f" | grad-norm {rec['grad_norm']:.3f} | tok/s {rec['tokens_per_s']:,.0f}"
            f" | eta {format_eta(eta_s)}")
