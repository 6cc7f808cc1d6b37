"""How much memory the device has: from --gpu-mem, or from the visible GPU through NVML."""
from __future__ import annotations

import re
from typing import Optional

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes in '80GiB', '141 GiB', '80GB', '8.5e10'."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"memory size {text!r} is not a number with a unit like 80GiB, "
                         "141GB or 8.5e10; write it that way")
    return int(float(match.group(1)) * _UNITS[unit])


def visible_gpu_memory() -> Optional[int]:
    """Total memory of GPU 0 through nvidia-ml-py, or None without a driver or GPU (NVML
    raises NVMLError_LibraryNotFound on a CPU machine)."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() < 1:
                return None
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: nothing to compare to
        return None
