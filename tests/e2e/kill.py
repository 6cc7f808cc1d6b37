"""Kill a CLI run mid-way, the way a node failure does: every process of it, at once."""
import os
import signal
import subprocess


def sigkill_when_logged(cmd, step: int) -> int:
    """Start `cmd` in its own session, SIGKILL the whole session once it logs step `step`'s
    progress line; the run's exit code."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if line.startswith(f"step {step:>5}/"):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    return proc.wait(timeout=120)
