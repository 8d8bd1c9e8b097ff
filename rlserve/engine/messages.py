"""Typed messages between the API server and the engine-core processes (pickled over ZMQ).

API → core: ``AddRequests``, ``AbortRequests``, ``FinishSample``, ``UtilityCall``, ``Shutdown``.
Core → API: ``EngineReady``, ``StepOutputs``, ``RequestFailed``, ``UtilityResult``, ``EngineDead``.
Messages on one socket arrive in the order they were sent, so a request sent after a weight update is
generated with the new weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlserve.engine.core import SeqUpdate
from rlserve.sampling import SamplingParams


@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool = False


@dataclass
class AddRequests:
    """The prompts of one HTTP request bound for one replica, admitted together (as ``LLM.generate`` does),
    so that they share their first step."""
    requests: list[AddRequest]


@dataclass
class AbortRequests:
    request_ids: list[str] | None  # None: every request


@dataclass
class FinishSample:
    request_id: str
    index: int
    stop_reason: int | str | None


@dataclass
class UtilityCall:
    call_id: int
    method: str
    kwargs: dict = field(default_factory=dict)


@dataclass
class Shutdown:
    pass


@dataclass
class EngineReady:
    replica: int
    info: dict
    pid: int


@dataclass
class StepOutputs:
    replica: int
    updates: list[SeqUpdate]
    stats: dict | None = None


@dataclass
class RequestFailed:
    request_id: str
    message: str
    status: int = 400


@dataclass
class UtilityResult:
    call_id: int
    result: Any = None
    error: str | None = None
    status: int = 500


@dataclass
class EngineDead:
    replica: int
    message: str
