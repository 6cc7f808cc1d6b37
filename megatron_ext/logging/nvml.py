"""GPU statistics through nvidia-ml-py, sampled by each node's local rank 0. A GPU node without
NVML (no driver) gets one notice and training carries on; a machine without CUDA has no GPUs
to watch, and the run's `fallbacks:` line already says "no NVML"."""
from __future__ import annotations

import json
import os
import socket
from typing import Callable, Dict, Optional

import torch


class GpuMonitor:
    """Per-GPU utilisation, memory, power, temperature and SM clock of this node."""

    def __init__(self, interval: int, local_rank: int, out_dir: str,
                 log: Callable[[str], None] = print):
        self.interval, self._nvml = interval, None
        self.path = os.path.join(out_dir, "gpu_stats", f"{socket.gethostname()}.jsonl")
        if interval <= 0 or local_rank != 0:
            return
        try:
            import pynvml
            pynvml.nvmlInit()
        except Exception as err:  # noqa: BLE001 - NVMLError_LibraryNotFound, no driver, ...
            if torch.cuda.is_available():
                log(f"NVML unavailable on {socket.gethostname()} ({type(err).__name__}: {err}); "
                    "GPU stats are off, training continues")
            return
        self._nvml = pynvml
        self.count = pynvml.nvmlDeviceGetCount()
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    @property
    def active(self) -> bool:
        return self._nvml is not None

    def sample(self) -> Dict[str, float]:
        nv, stats = self._nvml, {}
        for i in range(self.count):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            util, mem = nv.nvmlDeviceGetUtilizationRates(h), nv.nvmlDeviceGetMemoryInfo(h)
            stats.update({
                f"gpu{i}/util_pct": float(util.gpu),
                f"gpu{i}/mem_used_gib": mem.used / 2**30,
                f"gpu{i}/mem_total_gib": mem.total / 2**30,
                f"gpu{i}/power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                f"gpu{i}/temp_c": float(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                f"gpu{i}/sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
            })
        return stats

    def maybe_sample(self, step: int) -> Optional[Dict[str, float]]:
        """Every `interval` steps: the stats, also appended to gpu_stats/<host>.jsonl."""
        if not self.active or step % self.interval:
            return None
        stats = self.sample()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **stats}) + "\n")
        return stats
