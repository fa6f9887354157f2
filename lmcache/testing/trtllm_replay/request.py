"""An ``LlmRequest`` look-alike: the request object TRT-LLM hands to a connector.

Connectors read a handful of members (``request_id``, ``get_tokens(0)``, ``prompt_len``, the
context position fields, ``cache_salt``...). The replay keeps the same names and semantics so a
connector that works here reads the same values inside TRT-LLM. ``CppRequestView`` reproduces the
one trap of the real API: ``get_num_new_matched_tokens`` receives the C++ base object, on which
no ``py_*`` attribute exists.
"""

from __future__ import annotations

import enum
import hashlib
from typing import Any


class LlmRequestState(enum.Enum):
    """The subset of TRT-LLM's request states the connector state machines go through."""

    CONTEXT_INIT = "CONTEXT_INIT"
    GENERATION_IN_PROGRESS = "GENERATION_IN_PROGRESS"
    GENERATION_COMPLETE = "GENERATION_COMPLETE"
    DISAGG_GENERATION_TRANS_IN_PROGRESS = "DISAGG_GENERATION_TRANS_IN_PROGRESS"  # async load
    DISAGG_CONTEXT_TRANS_IN_PROGRESS = "DISAGG_CONTEXT_TRANS_IN_PROGRESS"  # async save


def cache_salt_to_id(salt: str | None) -> int | None:
    """A stable 64-bit id for a cache salt (TRT-LLM exposes ``cache_salt_id`` on newer revisions)."""
    if salt is None:
        return None
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")


class LlmRequest:
    """One request as the executor and the connector see it (beam width 1)."""

    def __init__(
        self,
        request_id: int,
        prompt: list[int],
        max_new_tokens: int,
        *,
        cache_salt: str | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        self.request_id = request_id
        self.py_request_id = request_id
        self.prompt_len = len(prompt)
        self.max_new_tokens = max_new_tokens
        self.py_max_new_tokens = max_new_tokens
        self.cache_salt = cache_salt
        self.cache_salt_id = cache_salt_to_id(cache_salt)
        self.state = LlmRequestState.CONTEXT_INIT
        self.context_current_position = 0
        self.context_chunk_size = self.prompt_len
        self.is_generation_only_request = False
        self.is_dummy_request = False
        self.kv_cache_retention_config = None
        self.multimodal_positions = None
        self.py_draft_tokens: list[int] = []
        self.py_num_connector_matched_tokens = 0
        self.num_connector_matched_tokens = 0
        # Host-visible tokens (what get_tokens returns) and the "device" tokens the model reads.
        # They differ only under the overlap scheduler, where the host learns a token one
        # iteration after it was sampled.
        self._tokens: list[int] = list(prompt)
        self.device_tokens: list[int] = list(prompt)
        self.num_kv = 0  # positions whose K/V are in the pool (computed or loaded)
        self.allocated = False  # whether the executor holds this request's blocks
        self.logits: list[Any] = []

    # --- members connectors read -------------------------------------------------------
    def get_tokens(self, beam: int | None = None) -> list[int] | list[list[int]]:
        """Beam-0 tokens (prompt + generated so far); without ``beam``, a list per beam."""
        if beam is None:
            return [list(self._tokens)]
        if beam != 0:
            raise IndexError("the replay runs beam width 1")
        return list(self._tokens)

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position

    @property
    def is_context_init_state(self) -> bool:
        return self.state == LlmRequestState.CONTEXT_INIT

    @property
    def is_generation_in_progress_state(self) -> bool:
        return self.state == LlmRequestState.GENERATION_IN_PROGRESS

    @property
    def is_finished(self) -> bool:
        return self.state == LlmRequestState.GENERATION_COMPLETE

    @property
    def is_first_context_chunk(self) -> bool:
        return self.context_current_position == 0

    @property
    def is_last_context_chunk(self) -> bool:
        return self.context_current_position + self.context_chunk_size >= self.prompt_len

    # --- executor side -----------------------------------------------------------------
    @property
    def num_generated(self) -> int:
        return len(self._tokens) - self.prompt_len

    def append_token(self, token: int) -> None:
        """Record a token the host has just learned was sampled (executor side)."""
        self._tokens.append(token)

    def set_prepopulated_prompt_len(self, prepopulated: int, tokens_per_block: int) -> None:
        """Skip the reused/loaded prefix; a non-final chunk is shortened to end on a block boundary."""
        if prepopulated >= self.prompt_len:
            raise RuntimeError(
                f"request {self.request_id}: {prepopulated} prepopulated tokens >= prompt length "
                f"{self.prompt_len}; the last prompt token must be computed"
            )
        if prepopulated <= 0:
            return
        chunk = self.context_chunk_size
        if prepopulated + chunk < self.prompt_len:
            end = (prepopulated + chunk) // tokens_per_block * tokens_per_block
            chunk = end - prepopulated
        self.context_current_position = prepopulated
        self.context_chunk_size = chunk
        self.num_kv = prepopulated

    def reset_for_recompute(self) -> None:
        """After a preemption freed the pages: run again from the first token, the tokens generated
        so far folded into the prompt (TRT-LLM's pause at beam width 1), the remaining budget kept."""
        self.max_new_tokens -= self.num_generated
        self.py_max_new_tokens = self.max_new_tokens
        self.prompt_len = len(self._tokens)
        self.device_tokens = list(self._tokens)
        self.state = LlmRequestState.CONTEXT_INIT
        self.context_current_position = 0
        self.context_chunk_size = self.prompt_len
        self.num_kv = 0
        self.allocated = False
        self.py_num_connector_matched_tokens = self.num_connector_matched_tokens = 0

    def __repr__(self) -> str:
        return (
            f"LlmRequest(id={self.request_id}, prompt_len={self.prompt_len}, "
            f"pos={self.context_current_position}, tokens={len(self._tokens)}, state={self.state.name})"
        )


class CppRequestView:
    """The C++ ``LlmRequest`` that ``get_num_new_matched_tokens`` receives: no ``py_*`` members."""

    __slots__ = ("_req",)

    def __init__(self, req: LlmRequest) -> None:
        object.__setattr__(self, "_req", req)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("py_") or name.startswith("_"):
            raise AttributeError(
                f"{name!r}: get_num_new_matched_tokens receives TRT-LLM's C++ LlmRequest, "
                "which has no Python-side (py_*) attributes"
            )
        return getattr(self._req, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the C++ LlmRequest view is read-only")

    def __repr__(self) -> str:
        return f"CppRequestView({self._req!r})"
