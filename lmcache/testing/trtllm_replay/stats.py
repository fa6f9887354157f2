"""What ``ReplayExecutor.generate`` returns and what the executor records per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .request import LlmRequest


@dataclass
class GenerationResult:
    """Generated tokens of one prompt and the float32 logits that produced each of them."""

    tokens: list[int]
    logits: torch.Tensor  # [len(tokens), vocab_size], float32, on CPU
    request_id: int = -1
    prompt_len: int = 0
    num_device_matched_tokens: int = 0
    num_connector_matched_tokens: int = 0
    cancelled: bool = False  # ended by ``ReplayExecutor.cancel`` (tokens are those generated so far)


@dataclass(frozen=True)
class DispatchedLoad:
    """A ``PrefixLoad`` the executor put into ``SchedulerOutput.prefix_loads``."""

    reservation_id: int
    start: int
    end: int
    is_async: bool


@dataclass
class RequestStats:
    prompt_len: int
    device_matched_tokens: int = 0
    connector_matched_tokens: int = 0
    connector_load_async: bool = False
    reservation_ids: list[int] = field(default_factory=list)  # every reserve_prefix id, in order
    prefix_loads: list[DispatchedLoad] = field(default_factory=list)
    resets: int = 0  # rollbacks (allocation freed, request_reset, replay)
    freed_pages: list[tuple[int, int]] = field(default_factory=list)
    """(group, page) given back while it ran (``free_passed_pages``: a sliding window passed them)."""
    preemptions: int = 0  # request_finished, pages freed, recomputed from scratch
    cancelled: bool = False


@dataclass
class ExecutorStats:
    """What the executor did, per request id and in total."""

    requests: dict[int, RequestStats] = field(default_factory=dict)
    iterations: int = 0
    forwards: int = 0

    @property
    def device_matched_tokens(self) -> dict[int, int]:
        return {rid: s.device_matched_tokens for rid, s in self.requests.items()}

    @property
    def connector_matched_tokens(self) -> dict[int, int]:
        return {rid: s.connector_matched_tokens for rid, s in self.requests.items()}

    def record_dispatched(self, output: Any) -> None:
        """Note the prefix loads a ``SchedulerOutput`` dispatched, per request."""
        for load in getattr(output, "prefix_loads", []):
            self.requests[load.request_id].prefix_loads.append(
                DispatchedLoad(load.reservation_id, load.start, load.end, load.is_async)
            )

    def result(self, req: LlmRequest, vocab_size: int) -> GenerationResult:
        """What ``generate`` returns for a request that ended."""
        s = self.requests[req.request_id]
        return GenerationResult(
            tokens=req.get_tokens(0)[s.prompt_len :],  # a preemption folds tokens into prompt_len
            logits=torch.stack(req.logits) if req.logits else torch.empty(0, vocab_size),
            request_id=req.request_id,
            prompt_len=s.prompt_len,
            num_device_matched_tokens=s.device_matched_tokens,
            num_connector_matched_tokens=s.connector_matched_tokens,
            cancelled=s.cancelled,
        )
