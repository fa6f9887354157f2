"""Where an executor's TP ranks live: all in this process (the default), or one per OS process; or
the executor is one attention-DP rank (``AttentionDPOwner``).

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

from lmcache.integration.tensorrt_llm._trtllm import set_process_provider, set_rank_provider

_simulated = threading.local()


def _simulated_rank_or_none() -> int | None:
    return getattr(_simulated, "rank", None)


def _simulated_process_or_none() -> int | None:
    return getattr(_simulated, "process", None)


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


@contextlib.contextmanager
def simulated_process(key: int) -> Iterator[None]:
    """Make ``process_key()`` answer ``key`` in this thread while the block runs: what TRT-LLM keeps
    one of per process (the in-process engine, a cache-server connection) is then this key's own."""
    set_process_provider(_simulated_process_or_none)
    previous = _simulated_process_or_none()
    _simulated.process = key
    try:
        yield
    finally:
        _simulated.process = previous


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

    @property
    def attention_dp_rank(self) -> int | None:
        """The owner's rank under attention DP (``SchedulerOutput.attention_dp_rank``), else None."""
        return None

    def acting_as(self, rank: int) -> contextlib.AbstractContextManager[None]:
        """Run a block as TP rank ``rank`` of these ranks (what ``mpi_rank()`` answers in it)."""
        return simulated_rank(rank)

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
    """All ranks in this process, run one after another. ``separate_processes``: each rank's connector
    code runs in a simulated process of its own (``process_key()``), as TRT-LLM's one process per
    rank: its own in-process engine and cache-server connection; else they share this process's."""

    def __init__(self, size: int, *, separate_processes: bool = False) -> None:
        super().__init__(size, range(size))
        self.separate_processes = separate_processes

    @contextlib.contextmanager
    def acting_as(self, rank: int) -> Iterator[None]:
        process = simulated_process(rank) if self.separate_processes else contextlib.nullcontext()
        with process, simulated_rank(rank):
            yield

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


class AttentionDPOwner(Ranks):
    """One attention-DP rank of ``owners``: its own requests, its own connector scheduler and worker,
    all KV heads in its pool (attention is not split), and no collective with the other owners
    (TRT-LLM R-new's manager neither broadcasts nor gathers under attention DP, and pickles nothing).
    Its connector runs as MPI rank ``owner`` in a simulated process of its own, as each rank is its
    own process in TRT-LLM."""

    def __init__(self, owner: int, owners: int) -> None:
        if not 0 <= owner < owners:
            raise ValueError(f"attention-DP rank {owner} is not a rank of {owners}")
        super().__init__(1, [0])
        self.owner = owner
        self.owners = owners

    @property
    def attention_dp_rank(self) -> int:
        return self.owner

    @contextlib.contextmanager
    def acting_as(self, rank: int) -> Iterator[None]:
        with simulated_process(self.owner), simulated_rank(self.owner):
            yield

    def broadcast(self, value: Any) -> Any:
        return value

    def broadcast_copies(self, value: Any) -> dict[int, Any]:
        return {0: value}

    def gather(self, local_values: dict[int, Any]) -> list[Any]:
        return [local_values[0]]

    def gather_heads(self, local_outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return local_outputs
