"""Where an executor's TP ranks live: all in this process (the default), or one per OS process.

TRT-LLM runs one process per rank: the scheduler's answers and the connector metadata are broadcast
from rank 0, ``get_finished`` is all-gathered and intersected, and the model's TP collectives join
the ranks' partial results. ``Ranks`` is that communication as the replay needs it. ``LocalRanks``
keeps every rank in this process (a broadcast is a pickle round trip, a gather is a list);
``ProcessGroupRanks`` hosts one rank per process over ``torch.distributed`` (gloo, on CPU and on
CUDA pools alike, several ranks per GPU included), each process running the same deterministic
executor loop.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from lmcache.integration.tensorrt_llm._trtllm import set_rank_provider

_simulated = threading.local()


def _simulated_rank_or_none() -> int | None:
    return getattr(_simulated, "rank", None)


@contextlib.contextmanager
def simulated_rank(rank: int) -> Iterator[None]:
    """Make ``mpi_rank()`` answer ``rank`` in this thread while the block runs.

    The replay hosts several TRT-LLM ranks in one process, so the connector code it drives cannot
    learn its rank from MPI; this installs the replay's rank provider in the import shim (outside
    a block, the provider defers to TRT-LLM) and nests: the previous rank comes back on exit.
    """
    set_rank_provider(_simulated_rank_or_none)
    previous = _simulated_rank_or_none()
    _simulated.rank = rank
    try:
        yield
    finally:
        _simulated.rank = previous


class Ranks(ABC):
    """The TP ranks of one executor and the collectives between them."""

    def __init__(self, size: int, local: Sequence[int]) -> None:
        if size < 1 or not local or any(not 0 <= r < size for r in local):
            raise ValueError(f"local ranks {list(local)} are not ranks of a world of {size}")
        self.size = size
        self.local = tuple(local)

    @property
    def hosts_root(self) -> bool:
        """Rank 0 (the connector scheduler's rank) lives in this process."""
        return 0 in self.local

    @abstractmethod
    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` as every rank receives it (pickled; ignored where rank 0 is not hosted)."""

    @abstractmethod
    def broadcast_copies(self, value: Any) -> dict[int, Any]:
        """Per local rank, rank 0's ``value`` as that rank binds it: rank 0 the object itself, the
        others an unpickled copy each."""

    @abstractmethod
    def gather(self, local_values: dict[int, Any]) -> list[Any]:
        """Every rank's value, in rank order, from each process's ``{local rank: value}``."""

    @abstractmethod
    def gather_heads(self, local_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every rank's attention output ``[1, n]`` in rank order, from the local ranks' outputs
        (in ``local`` order); the tensors are copied bit for bit."""


class LocalRanks(Ranks):
    """All ranks in this process, run one after another."""

    def __init__(self, size: int) -> None:
        super().__init__(size, range(size))

    def broadcast(self, value: Any) -> Any:
        return pickle.loads(pickle.dumps(value))

    def broadcast_copies(self, value: Any) -> dict[int, Any]:
        blob = pickle.dumps(value)
        return {rank: value if rank == 0 else pickle.loads(blob) for rank in self.local}

    def gather(self, local_values: dict[int, Any]) -> list[Any]:
        return [local_values[rank] for rank in range(self.size)]

    def gather_heads(self, local_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return local_outputs


class ProcessGroupRanks(Ranks):
    """This process is rank ``rank`` of the initialized default ``torch.distributed`` group."""

    def __init__(self) -> None:
        if not dist.is_initialized():
            raise RuntimeError("ProcessGroupRanks needs torch.distributed.init_process_group first")
        super().__init__(dist.get_world_size(), [dist.get_rank()])

    @property
    def rank(self) -> int:
        return self.local[0]

    def broadcast(self, value: Any) -> Any:
        box = [pickle.dumps(value) if self.hosts_root else None]
        dist.broadcast_object_list(box, src=0)
        return pickle.loads(box[0])

    def broadcast_copies(self, value: Any) -> dict[int, Any]:
        received = self.broadcast(value)
        return {self.rank: value if self.hosts_root else received}

    def gather(self, local_values: dict[int, Any]) -> list[Any]:
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, local_values[self.rank])
        return out

    def gather_heads(self, local_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        (mine,) = local_outputs
        host = mine.detach().to("cpu").contiguous()  # gloo moves host tensors
        parts = [torch.empty_like(host) for _ in range(self.size)]
        dist.all_gather(parts, host)
        return [part.to(mine.device) for part in parts]
