"""The replay's simulated rank: what ``mpi_rank()`` answers to the connector code the replay drives."""

import threading

from lmcache.integration.tensorrt_llm._trtllm import mpi_rank
from lmcache.testing.trtllm_replay import simulated_rank


def test_simulated_rank_nests_and_restores() -> None:
    outside = mpi_rank()  # TRT-LLM's answer, or 0 without TRT-LLM
    with simulated_rank(3):
        assert mpi_rank() == 3
        with simulated_rank(1):
            assert mpi_rank() == 1
        assert mpi_rank() == 3
    assert mpi_rank() == outside


def test_simulated_rank_is_per_thread() -> None:
    seen: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def other() -> None:
        with simulated_rank(5):
            seen["other"] = mpi_rank()
            inside.set()
            assert release.wait(30)

    thread = threading.Thread(target=other)
    with simulated_rank(4):
        thread.start()
        assert inside.wait(30)
        seen["main"] = mpi_rank()
        release.set()
    thread.join(30)
    assert seen == {"other": 5, "main": 4}
