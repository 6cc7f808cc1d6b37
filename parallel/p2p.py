"""Ring exchange: pass a tensor to the next rank of a group while receiving the previous one's.

Ring attention starts the exchange, computes on the block it already holds, then waits, so
communication hides behind compute. Each step posts exactly one send and one receive per rank
in one ``batch_isend_irecv``: the pattern seen correct on gloo for 2, 3 and 4 ranks (larger
batches of p2p ops gave wrong results with gloo in pipeline parallelism).
"""

from typing import List, Optional

import torch
import torch.distributed as dist


class PendingShift:
    """An exchange in flight; ``wait()`` returns the tensor received from the previous rank."""

    def __init__(self, received: torch.Tensor, works: List[dist.Work], sent: torch.Tensor):
        self._received = received
        self._works = works
        self._sent = sent  # kept alive until the send completes

    def wait(self) -> torch.Tensor:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], None
        return self._received


def ring_shift(tensor: torch.Tensor, group: dist.ProcessGroup, *, tag: int = 0,
               received: Optional[torch.Tensor] = None) -> PendingShift:
    """Start sending ``tensor`` to rank+1 of ``group`` and receiving rank-1's into a new buffer
    like ``tensor``, or into ``received`` when rank-1 sends another size.

    Use a distinct ``tag`` for each kind of message that can be in flight at the same time
    (gloo matches messages by tag; NCCL by issue order, which is the same on every rank here).
    Do not modify ``tensor`` until ``wait()`` returns.
    """
    size = dist.get_world_size(group=group)
    rank = dist.get_rank(group=group)
    send_to = dist.get_global_rank(group, (rank + 1) % size)
    recv_from = dist.get_global_rank(group, (rank - 1) % size)
    tensor = tensor.contiguous()
    if received is None:
        received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, send_to, group=group, tag=tag),
        dist.P2POp(dist.irecv, received, recv_from, group=group, tag=tag),
    ]
    return PendingShift(received, dist.batch_isend_irecv(ops), tensor)
