"""Ring exchange: pass a tensor to the next rank of a group while receiving the previous one's.

Ring attention and the generation engine's pipelined decode start the exchange, compute on
what they already hold, then wait, so communication hides behind compute. Each step posts
exactly one send and one receive per rank: on GPUs (NCCL) in one ``batch_isend_irecv``, which
NCCL needs (both ranks of a pair send first; unbatched, a rendezvous-size send would wait for a
receive posted after it); on CPU tensors (gloo) as a plain isend and irecv, the other pattern
seen correct on gloo for 2, 3 and 4 ranks (larger batches of p2p ops gave wrong results with
gloo in pipeline parallelism), which costs about half as much per exchange (its coalescing
bookkeeping: ~65 -> ~30 us to post, ~130 -> ~90 us a round trip, benchmarks/pp_decode_costs.py).
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
    send_to, recv_from = (rank + 1) % size, (rank - 1) % size  # ranks in the group
    tensor = tensor.contiguous()
    if received is None:
        received = torch.empty_like(tensor)
    if tensor.device.type == "cpu":
        works = [dist.isend(tensor, group=group, tag=tag, group_dst=send_to),
                 dist.irecv(received, group=group, tag=tag, group_src=recv_from)]
    else:
        works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor, group=group, tag=tag, group_peer=send_to),
            dist.P2POp(dist.irecv, received, group=group, tag=tag, group_peer=recv_from)])
    return PendingShift(received, works, tensor)
