"""Run monitoring: W&B, NVML GPU stats, progress lines."""
