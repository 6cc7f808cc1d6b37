"""GpuMonitor against a stand-in pynvml with fixed readings (no GPU needed): which NVML calls
become which record fields and units, the sampling interval, local rank 0 only, and the notice
when nvmlInit fails. Real NVML on a GPU is checked by the GPU check script (issue 13)."""
import json
import sys
import types

import torch

from megatron_ext.logging.nvml import GpuMonitor


def _stand_in_pynvml(fail=False):
    """The pynvml calls GpuMonitor makes, answering fixed values; `fail`: nvmlInit raises as
    pynvml does on a machine without the NVML library."""
    nv = types.ModuleType("pynvml")

    class NVMLError_LibraryNotFound(Exception):
        pass

    def init():
        if fail:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    nv.nvmlInit = init
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50 + h)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2**30 * (h + 1), total=2**37)
    nv.nvmlDeviceGetPowerUsage = lambda h: 300_000
    nv.nvmlDeviceGetTemperature = lambda h, kind: 61
    nv.nvmlDeviceGetClockInfo = lambda h, kind: 1980
    nv.NVML_TEMPERATURE_GPU, nv.NVML_CLOCK_SM = 0, 1
    return nv


def test_readings_become_records_every_interval_in_a_node_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_pynvml())
    mon = GpuMonitor(interval=5, local_rank=0, out_dir=str(tmp_path))
    assert mon.active and mon.maybe_sample(3) is None
    stats = mon.maybe_sample(5)
    assert stats["gpu1/util_pct"] == 51.0 and stats["gpu1/mem_used_gib"] == 2.0
    assert stats["gpu0/mem_total_gib"] == 128.0 and stats["gpu0/power_w"] == 300.0
    assert stats["gpu0/temp_c"] == 61.0 and stats["gpu0/sm_clock_mhz"] == 1980.0
    rec = json.loads(open(mon.path).read())
    assert rec["step"] == 5 and rec["gpu1/util_pct"] == 51.0
    assert not GpuMonitor(interval=5, local_rank=1, out_dir=str(tmp_path)).active


def test_failing_nvml_init_on_a_gpu_machine_logs_one_notice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_pynvml(fail=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    notes = []
    mon = GpuMonitor(interval=5, local_rank=0, out_dir=str(tmp_path), log=notes.append)
    assert not mon.active and mon.maybe_sample(5) is None
    assert len(notes) == 1 and "NVML unavailable" in notes[0] and "training continues" in notes[0]
    assert "NVMLError_LibraryNotFound: NVML Shared Library Not Found" in notes[0]


def test_no_notice_without_cuda(tmp_path, monkeypatch):
    """No GPUs to watch: the run's one `fallbacks:` line says "no NVML" instead."""
    monkeypatch.setitem(sys.modules, "pynvml", _stand_in_pynvml(fail=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    notes = []
    mon = GpuMonitor(interval=5, local_rank=0, out_dir=str(tmp_path), log=notes.append)
    assert not mon.active and notes == []
