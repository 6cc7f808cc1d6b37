"""megatron-core 0.16.1 dist_checkpointing: where the filesystem writers report their results.

`strategies/filesystem_async.py` keeps a module-level `_results_queue`, made at the first save
as a queue served by a spawned multiprocessing Manager process and kept for the run. Under
SLURM a requeue or scancel can end that Manager process while the trainer lives on to save
(seen in CI: BrokenPipeError in the SIGTERM save). A synchronous save writes and collects in
this process, so an in-process queue serves it; a background save's writer is a forked
process and keeps megatron's Manager queue."""
from __future__ import annotations

import queue
from typing import Dict

_MANAGER_QUEUE: Dict = {}  # megatron's Manager queue, kept for the next background save


def route_write_results(background: bool) -> None:
    """Point megatron's writers at an in-process queue for a synchronous save, and back at
    its Manager queue (made on first use when None) for a background one."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    if not hasattr(fsa, "_results_queue"):
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no "
                           "_results_queue: this workaround is for megatron-core 0.16.1; "
                           "revisit megatron_ext/compat/ckpt_writer.py for this version")
    current = fsa._results_queue
    if background:
        fsa._results_queue = _MANAGER_QUEUE.get("queue")
    else:
        if current is not None and not isinstance(current, queue.Queue):
            _MANAGER_QUEUE["queue"] = current
        fsa._results_queue = queue.Queue()
