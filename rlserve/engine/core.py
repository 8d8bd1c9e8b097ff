"""The engine core: a model, its KV cache and a scheduler, advanced one step at a time.

``step()`` is schedule → run the model → sample → update the sequences. With async scheduling it launches the
next step before it applies the one in flight (``_step_ahead``; the rule of what may run ahead: ``async_step.py``). Everything that changes the engine
from outside -- new requests, aborts, weight loads, prefix-cache resets -- is a method called between steps,
never during one. The core knows nothing about HTTP; text only for stop strings, which it finds itself
(``stop_strings.py``) so that a sample ends in the step that completed one. Token ids in, token ids out. It
reports a sequence to the front end when it finishes, or every step for streamed requests.
"""

from __future__ import annotations

import logging
import os
import random
import time

import torch

from rlserve.config import EngineConfig
from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.engine.async_step import must_apply_first
from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.messages import SeqUpdate
from rlserve.engine.runner import LaunchedStep
from rlserve.engine.scheduler import Scheduler, SchedulerOutput
from rlserve.engine.sequence import Request, Sequence, SequenceStatus, stream_seed
from rlserve.engine.stop_strings import StopStrings
from rlserve.engine.structured import GrammarCompiler
from rlserve.engine.validation import Limits, check_fits, check_prompt_ids
from rlserve.engine.worker import load_worker
from rlserve.tokenizer import load_tokenizer
from rlserve.sampling import SamplingParams

logger = logging.getLogger(__name__)


def request_seed_generator(seed: int | None, data_parallel_rank: int = 0) -> random.Random:
    """Where requests without a seed get theirs. ``seed`` None: OS entropy, so that replicas and restarts
    draw independent samples. A fixed seed is reproducible, and each data-parallel replica derives its own
    stream from it (replica 0 uses it as it is, as an offline ``LLM`` with that seed does): two replicas never
    give two identical unseeded requests the same samples."""
    if seed is None:
        return random.Random(int.from_bytes(os.urandom(16), "little"))
    if data_parallel_rank == 0:
        return random.Random(seed)
    return random.Random(stream_seed(seed, _REPLICA_SALT + data_parallel_rank))


_REPLICA_SALT = 0x7265706C696361  # keeps replica streams apart from the sample-index streams of a request


class EngineCore:
    def __init__(self, config: EngineConfig, tp: TensorParallel = SINGLE, attention_backend: str = "auto"):
        self.config = config
        loaded = load_worker(config, tp, attention_backend)
        self.model_dir, self.model, self.info, self.runner = loaded.model_dir, loaded.model, loaded.info, loaded.runner
        self.info.startup_seconds = loaded.startup_seconds
        info = self.info
        self.block_manager = BlockManager(info.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, info.max_num_seqs, info.max_num_batched_tokens,
                                   info.max_model_len, info.eos_token_ids, config.num_scheduler_steps)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens; longest context that fits: %d tokens "
                    "(max_model_len %d)", info.num_kv_blocks, config.block_size, info.kv_capacity_tokens,
                    min(info.max_model_len, info.kv_capacity_tokens), info.max_model_len)
        logger.info("async scheduling %s; up to %d decode steps per launch",
                    "on" if self.runner.async_scheduling else "off", config.num_scheduler_steps)
        self.grammars = GrammarCompiler(config.tokenizer or self.model_dir, info.eos_token_ids)
        self._tokenizer = None  # for stop strings (see ``tokenizer``)
        self.requests: dict[str, Request] = {}
        self.rng = request_seed_generator(config.seed, config.data_parallel_rank)
        self.weight_version = 0
        self.weights_partial = False  # a weight update failed half-way: the weights are a mix
        self.num_steps = 0
        # Async scheduling (engine/async_step.py): the launched step whose draws are not applied yet, and the
        # updates of one applied outside ``step()`` (``drain``), which the next ``step()`` returns first.
        self.in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
        self.drained: list[SeqUpdate] = []
        # A non-streamed sample is sent once, when it finishes; with an interval (an engine in its own process
        # sets one), also what it made since its last update, every interval_s: the front end then takes most of
        # a long batch in while it runs, and the message after the last step carries its last tokens only.
        self.partial_output_interval_s: float | None = None
        self._last_partial_output = time.monotonic()
        self.num_partial_updates = 0  # updates of running non-streamed samples sent on the interval's account

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    stream: bool = False) -> None:
        """Queue a request that ``validation.admit`` let in (the API server's admission, or ``LLM.generate``):
        the engine does not check it again."""
        if request_id in self.requests:
            raise RuntimeError(f"request_id {request_id!r} is already in use")  # the front end's ids are unique
        if params.max_tokens is None:
            raise RuntimeError(f"request {request_id} was not admitted (validation.admit resolves max_tokens)")
        self._check_runnable(prompt_token_ids, params)
        if self.scheduler.num_unfinished == 0:  # the interval counts from the start of the work, not the last work
            self._last_partial_output = time.monotonic()
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        stop_strings = StopStrings(self.tokenizer, prompt_token_ids, params) if params.stop else None
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        request = Request(request_id, list(prompt_token_ids), params, seed, stream, grammar=grammar,
                          stop_strings=stop_strings)
        self.scheduler.add_request(request)  # first: if it raises (a grammar's state), there is nothing to undo
        self.requests[request_id] = request

    def _check_runnable(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The two checks admission did against limits that may not be this replica's (a replica restarted on
        another node can have a smaller KV cache): cheap, and what stands between a request and a replica
        that stalls (a request its cache can never hold) or dies (an id outside the embedding is a device
        assert on CUDA). InvalidRequest, a 400, when one fails."""
        check_prompt_ids(prompt_token_ids, self.info.vocab_size)
        check_fits(len(prompt_token_ids), params.max_tokens, self.info.max_model_len, self.info.kv_capacity_tokens)

    @property
    def tokenizer(self):
        """Loaded at the first request with stop strings: an engine that never gets one never pays for it."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.config.tokenizer or self.model_dir,
                                             trust_remote_code=self.config.trust_remote_code)  # as the grammars
        return self._tokenizer

    @property
    def limits(self) -> Limits:
        return Limits.of(self.info, self.config.logprobs_limit(self.info.vocab_size))

    def abort_request(self, request_id: str) -> list[SeqUpdate]:
        """End a request; its samples report finish_reason "abort" with what they generated so far."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        ended = self.scheduler.abort_request(request)
        self.runner.release(ended)
        updates = [self._update(seq) for seq in ended]
        request.seqs = []  # see _stepped
        return updates

    def abort_all(self) -> list[SeqUpdate]:
        updates = []
        for request_id in list(self.requests):
            updates += self.abort_request(request_id)
        return updates

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.in_flight is not None or bool(self.drained)

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[SeqUpdate]:
        if self.runner.async_scheduling:
            return self._step_ahead()
        sched = self.scheduler.schedule()
        self.runner.release(sched.preempted)  # their tables start over when they run again
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched)
        return self._stepped(self.scheduler.update_from_output(sched, sampled, self.weight_version))

    def _step_ahead(self) -> list[SeqUpdate]:
        """Async scheduling: schedule and launch the next step while the one in flight still runs on the device,
        then apply that one (its draws were copying back meanwhile). The launched step stays in flight unless
        ``async_step.must_apply_first`` says the host needs its draws before building another."""
        sched = self.scheduler.schedule()
        self.runner.release(sched.preempted)
        launched = None
        if not sched.is_empty:
            try:
                launched = self.runner.launch(sched)
            except Exception:
                # As in sync mode, where step t's tokens were returned before step t+1 failed: the step in flight
                # is applied and kept with the drained updates (``take_drained``, the next ``step()``), then the
                # error goes up. Nothing is cleared before the launch succeeds.
                try:
                    self.drain()
                except Exception:
                    logger.exception("applying the step in flight after a failed launch failed too")
                raise
            self.scheduler.advance(sched)
        updates, self.drained = self.drained, []
        previous, self.in_flight = self.in_flight, None
        if previous is not None:
            updates += self._apply(*previous)
        if launched is not None:
            if must_apply_first(sched):
                updates += self._apply(sched, launched)
            else:
                self.in_flight = sched, launched
        return updates

    def _apply(self, sched: SchedulerOutput, launched: LaunchedStep) -> list[SeqUpdate]:
        result = self.runner.collect(launched)
        return self._stepped(self.scheduler.apply_output(sched, result, self.weight_version))

    def _stepped(self, touched: list[Sequence]) -> list[SeqUpdate]:
        """After a step's draws are applied: the updates to send, finished sequences' rows and requests let go."""
        self.num_steps += 1
        done = SequenceStatus.FINISHED_STOPPED  # and every status after it: status.is_finished, inline (hot)
        updates = [self._update(seq) for seq in touched if seq.request.stream or seq.status >= done]
        if self._partial_output_due():
            partial = [seq for seq in touched if not seq.request.stream and seq.status < done
                       and seq.num_output_tokens > seq.num_sent_tokens]
            self.num_partial_updates += len(partial)
            updates += [self._update(seq) for seq in partial]
        finished = [seq for seq in touched if seq.status >= done]
        self.runner.release(finished)
        for seq in finished:
            request = seq.request
            if request.seqs and request.is_finished:
                self.requests.pop(request.request_id, None)
                # Its samples point at it and it at them: a reference cycle that would keep every token and
                # logprob list of the request alive until a collector pass, and make full passes walk them (a
                # 512-sample request is ~10^6 list items). Letting go of the samples frees it all at once.
                request.seqs = []
        return updates

    def _partial_output_due(self) -> bool:
        if self.partial_output_interval_s is None:
            return False
        now = time.monotonic()
        if now - self._last_partial_output < self.partial_output_interval_s:
            return False
        self._last_partial_output = now
        return True

    def drain(self) -> None:
        """Apply the step in flight, if any (async scheduling), before something changes the engine from outside
        -- weights, the prefix cache: its tokens were drawn before the change. ``step()`` returns its updates
        (``take_drained`` hands them over sooner)."""
        if self.in_flight is not None:
            previous, self.in_flight = self.in_flight, None
            self.drained += self._apply(*previous)

    def take_drained(self) -> list[SeqUpdate]:
        updates, self.drained = self.drained, []
        return updates

    def _update(self, seq: Sequence) -> SeqUpdate:
        start = seq.num_sent_tokens
        seq.num_sent_tokens = seq.num_output_tokens
        p = seq.params
        request = seq.request
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is not None:  # sent once, for all samples
            request.prompt_logprobs = None
        return SeqUpdate(
            request_id=seq.request.request_id, index=seq.sample_index,
            token_ids=seq.token_ids[seq.num_prompt_tokens + start:],  # one copy (output_token_ids would be two)
            sampled_logprobs=seq.sampled_logprobs[start:] if p.logprobs is not None else None,
            top_logprobs=seq.top_logprobs.since(start) if seq.top_logprobs is not None else None,
            finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason,
            weight_versions=list(seq.weight_versions), num_cached_tokens=request.num_cached_tokens,
            prompt_logprobs=prompt_logprobs,
            # With stop strings, the text their detokenizer made (cut, when one ended the sample; decoded with the
            # prompt as context either way, as a streamed response's deltas are); otherwise the API decodes the tokens
            text=seq.stop_state.final_text() if seq.stop_state is not None and seq.status.is_finished else None)

    # -- weights and cache -------------------------------------------------------------------------
    def validate_weights(self, metadata: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        """Check names, shapes and dtypes of an update before any byte moves; raises ValueError."""
        shapes = self.model.hf_weight_shapes()
        for name, dtype, shape in metadata:
            if name not in shapes:
                raise ValueError(f"unknown parameter name {name!r}")
            if tuple(shape) != shapes[name]:
                raise ValueError(f"{name}: shape must be {list(shapes[name])}, got {list(shape)}")
            if not dtype.is_floating_point:
                raise ValueError(f"{name}: dtype must be a floating-point type, got {dtype}")

    def load_weights(self, weights, new_version: int | None = None) -> int:
        """Load Hugging Face-named tensors between steps; bumps the weight version, resets the prefix cache."""
        self.drain()
        self.model.load_weights(weights)
        self.weight_version = self.weight_version + 1 if new_version is None else new_version
        self.reset_prefix_cache()
        return self.weight_version

    def join_weight_sync(self, spec: dict, rank: int):
        """Join a trainer's weight-sync group as ``rank`` (blocks until every rank arrived; run it in a thread).
        With "gloo" the tensors arrive in host memory and are copied onto the device as they load."""
        from rlserve.distributed.weight_sync import GroupSpec, WeightSyncGroup
        spec = GroupSpec(**spec)
        device = self.info.device if spec.backend == "nccl" else torch.device("cpu")
        return WeightSyncGroup(spec, rank, device)

    def warm_up_weight_sync(self, group) -> None:
        """The group's first collective, run between steps so it is ordered with the engine's own."""
        group.warm_up()

    def receive_weights(self, group, buckets, discard: bool = False) -> int:
        """Receive every bucket and load it (or, ``discard``, drop it: an update refused after the trainer
        began sending), then meet the trainer in a barrier where the protocol has one; returns the bytes."""
        from rlserve.distributed.weight_sync import receive_buckets
        self.drain()

        def load(named):
            if not discard:
                self.model.load_weights(named)
                self.weights_partial = True  # until the whole update has landed

        nbytes = receive_buckets(group, buckets, load)
        if group.spec.barrier_after_update:
            group.barrier()
        return nbytes

    def close_weight_sync(self, group) -> None:
        """Close ``group`` (None: no group, but joins in flight on other ranks are dropped too)."""
        if group is not None:
            group.close()

    def shutdown(self) -> None:
        """Release what the engine holds: a single-process core, its device memory (the runner's graphs, KV cache
        and weights, ``ModelRunner.free_device_memory``); a tensor-parallel one overrides this to stop its workers."""
        self.in_flight = None  # its device work ends before the memory goes (release_cuda_graphs synchronizes)
        self.model = None
        self.runner.free_device_memory()

    def reset_prefix_cache(self) -> None:
        self.drain()  # the step in flight registers its blocks when applied: under the epoch they were computed in
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks, "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_hit_tokens": bm.num_hit_tokens, "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "num_multi_step_launches": self.scheduler.num_multi_step_launches,
            "num_partial_updates": self.num_partial_updates,
            "weight_version": self.weight_version, "device": str(self.info.device),
        }
