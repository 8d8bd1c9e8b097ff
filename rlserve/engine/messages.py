"""Typed messages between the API server and the engine-core processes (pickled over ZMQ).

API → core: ``AddRequests``, ``AbortRequests``, ``UtilityCall`` (of one typed operation: ``Ping``, ``GetStats``,
``ResetPrefixCache``, ``Pause``, ``Resume``, ``InitWeightSync``, ``CloseWeightSync``, ``BeginWeightUpdate``,
``UpdateWeights``, ``FinishWeightUpdate``), ``Shutdown``.
Core → API: ``EngineReady``, ``StepOutputs`` (of ``SeqUpdate``s), ``RequestFailed``, ``UtilityResult``,
``EngineDead``.
Messages on one socket arrive in the order they were sent, so a request sent after a weight update is
generated with the new weights.

Plain dataclasses of Python values and numpy arrays, no torch: the API process imports this module, and it
must not pull torch in (check: `python -c "import sys, rlserve.engine.messages; print('torch' in sys.modules)"`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlserve.outputs import PromptLogprobs, TopLogprobs
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


# -- utility operations: one class each, dispatched by type in ``EngineCoreProc.utility`` -------------------
@dataclass
class Ping:
    pass


@dataclass
class GetStats:
    pass


@dataclass
class ResetPrefixCache:
    pass


@dataclass
class Pause:
    mode: str  # "abort", "wait" or "keep"


@dataclass
class Resume:
    pass


@dataclass
class InitWeightSync:
    spec: dict  # a GroupSpec's fields (weight_sync.GroupSpec imports torch; this module must not)


@dataclass
class CloseWeightSync:
    pass


@dataclass
class BeginWeightUpdate:
    update_timeout_s: float


@dataclass
class UpdateWeights:
    """With ``version``: a whole update. Without: one part of an update (``run_version``: the version the run
    will hold). ``discard``: receive and drop a refused update."""
    buckets: list[dict]
    version: int | None = None
    run_version: int | None = None
    run_timeout_s: float = 60.0
    discard: bool = False


@dataclass
class FinishWeightUpdate:
    version: int


Utility = (Ping | GetStats | ResetPrefixCache | Pause | Resume | InitWeightSync | CloseWeightSync
           | BeginWeightUpdate | UpdateWeights | FinishWeightUpdate)


@dataclass
class UtilityCall:
    call_id: int
    op: Utility


@dataclass
class Shutdown:
    pass


@dataclass
class EngineReady:
    replica: int
    info: dict
    pid: int
    generation: int = 0  # restarts of this replica before it (Ray): the server drops an older one's messages


@dataclass
class SeqUpdate:
    """New output of one sample of a request: each step's for streamed requests; for the others, what it made
    since its last update, when it finishes and every ``EngineCore.partial_output_interval_s`` (replicas)."""
    request_id: str
    index: int
    token_ids: list[int]
    sampled_logprobs: list[float] | None = None
    top_logprobs: TopLogprobs | None = None  # its tokens' top N: two [T, N] arrays, pickled as one buffer each
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # the request's, once, with the first update after its prefill
    text: str | None = None  # a finished sample with stop strings: its text as the engine cut it


@dataclass
class StepOutputs:
    replica: int
    updates: list[SeqUpdate]
    stats: dict | None = None
    generation: int = 0


@dataclass
class RequestFailed:
    """A request the engine could not take (admission let it in: a grammar the tokenizer refuses, a bug)."""
    request_id: str
    message: str
    status: int = 400
    field: str | None = None


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
    generation: int = 0


def _protocol_fingerprint() -> str:
    """A digest of the modules whose classes travel pickled between the API server and the replicas: a replica
    on another node running another rlserve would otherwise fail on the first message that differs, or worse,
    unpickle it into the wrong fields. It says "same source, same Python, same numpy major", nothing finer."""
    import sys

    import numpy

    import rlserve.outputs
    import rlserve.sampling
    # pickles of numpy arrays and of Python objects also depend on these
    digest = hashlib.sha256(f"python {sys.version_info[:2]} numpy {numpy.__version__.split('.')[0]}".encode())
    for module_file in (__file__, rlserve.outputs.__file__, rlserve.sampling.__file__):
        digest.update(Path(module_file).read_bytes())
    return digest.hexdigest()[:16]


PROTOCOL = _protocol_fingerprint()
