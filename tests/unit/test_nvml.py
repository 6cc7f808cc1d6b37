"""GPU stats: real NVML calls mapped to records; a machine without NVML gets one notice."""
import json
import sys
import types

from megatron_ext.logging.nvml import GpuMonitor


def _fake_pynvml(fail=False):
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


def test_samples_every_interval_into_a_node_file(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    mon = GpuMonitor(interval=5, local_rank=0, out_dir=str(tmp_path))
    assert mon.active and mon.maybe_sample(3) is None
    stats = mon.maybe_sample(5)
    assert stats["gpu1/util_pct"] == 51.0 and stats["gpu1/mem_used_gib"] == 2.0
    assert stats["gpu0/mem_total_gib"] == 128.0 and stats["gpu0/power_w"] == 300.0
    assert stats["gpu0/temp_c"] == 61.0 and stats["gpu0/sm_clock_mhz"] == 1980.0
    rec = json.loads(open(mon.path).read())
    assert rec["step"] == 5 and rec["gpu1/util_pct"] == 51.0
    assert not GpuMonitor(interval=5, local_rank=1, out_dir=str(tmp_path)).active


def test_missing_nvml_logs_one_notice(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail=True))
    notes = []
    mon = GpuMonitor(interval=5, local_rank=0, out_dir=str(tmp_path), log=notes.append)
    assert not mon.active and mon.maybe_sample(5) is None
    assert len(notes) == 1 and "NVML unavailable" in notes[0] and "training continues" in notes[0]
