"""The engine core: a model, its KV cache and a scheduler, advanced one step at a time.

``step()`` is schedule → run the model → sample → update the sequences. Everything that changes the engine
from outside -- new requests, aborts, weight loads, prefix-cache resets -- is a method called between steps,
never during one. The core knows nothing about HTTP or text: token ids in, token ids out. It reports a
sequence to the front end when it finishes, or every step for streamed requests.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlserve.config import EngineConfig, RuntimeInfo
from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.runner import ModelRunner
from rlserve.engine.scheduler import Scheduler, check_fits
from rlserve.engine.sequence import Request, Sequence, SequenceStatus
from rlserve.engine.structured import GrammarCompiler, check_spec
from rlserve.models.llama import head_dim_of
from rlserve.models.loader import load_config, load_model, resolve_dtype, resolve_model_dir
from rlserve.sampling import SamplingParams

logger = logging.getLogger(__name__)


def validate_request(info: RuntimeInfo, prompt_token_ids: list[int], params: SamplingParams,
                     max_logprobs: int) -> int:
    """Everything about a request that can be checked before it is queued; raises ValueError naming the
    field and the limit. Returns the effective max_tokens. The API server runs it too, to answer 400s."""
    vocab = info.vocab_size
    if not prompt_token_ids:
        raise ValueError("prompt must not be empty")
    for t in prompt_token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
            raise ValueError(f"prompt token id {t!r} is outside the vocabulary [0, {vocab})")
    for t in params.stop_token_ids:
        if t >= vocab:
            raise ValueError(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab})")
    if params.logprobs is not None and params.logprobs > max_logprobs:
        raise ValueError(f"logprobs must be <= {max_logprobs}, got {params.logprobs}")
    if params.structured_outputs is not None:
        check_spec(params.structured_outputs)
    return check_fits(len(prompt_token_ids), params.max_tokens, info.max_model_len, info.kv_capacity_tokens)


@dataclass
class SeqUpdate:
    """New output of one sample of a request (all of it for non-streamed requests, sent when finished)."""
    request_id: str
    index: int
    token_ids: list[int]
    sampled_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    weight_versions: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0


def eos_token_ids(model_dir: Path, config) -> tuple[int, ...]:
    ids = None
    gen = model_dir / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


class EngineCore:
    def __init__(self, config: EngineConfig, tp: TensorParallel = SINGLE, attention_backend: str = "auto"):
        t0 = time.perf_counter()
        self.config = config
        self.model_dir = resolve_model_dir(config.model, config.revision)
        hf_config = load_config(self.model_dir)
        device = config.resolved_device()
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        dtype = resolve_dtype(config.dtype, hf_config, device)
        self.model = load_model(self.model_dir, hf_config, dtype, device, tp, config.load_format)
        t_load = time.perf_counter()
        max_model_len = self._max_model_len(hf_config)
        on_gpu = device.type == "cuda"
        self.info = RuntimeInfo(
            device=device, dtype=dtype, vocab_size=hf_config.vocab_size, max_model_len=max_model_len,
            num_kv_blocks=0, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs or (512 if on_gpu else 256),
            max_num_batched_tokens=config.max_num_batched_tokens or (8192 if on_gpu else 2048),
            eos_token_ids=eos_token_ids(self.model_dir, hf_config), model_name=config.model,
            architecture=type(self.model).__name__, num_layers=hf_config.num_hidden_layers,
            num_kv_heads=self.model.attention_layers[0].num_kv_heads, head_dim=head_dim_of(hf_config))
        self.runner = ModelRunner(config, self.info, self.model, 1, attention_backend)
        self.info.num_kv_blocks = self._num_kv_blocks()
        self.runner.reallocate_kv_cache(self.info.num_kv_blocks)
        t_graphs = time.perf_counter()
        self.runner.capture_cuda_graphs()
        capture_s = time.perf_counter() - t_graphs
        self.block_manager = BlockManager(self.info.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.info.max_num_seqs, self.info.max_num_batched_tokens,
                                   max_model_len, self.info.eos_token_ids)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens; longest context that fits: %d tokens "
                    "(max_model_len %d)", self.info.num_kv_blocks, config.block_size, self.info.kv_capacity_tokens,
                    min(max_model_len, self.info.kv_capacity_tokens), max_model_len)
        self.grammars = GrammarCompiler(config.tokenizer or self.model_dir, self.info.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.rng = random.Random(config.seed)
        self.weight_version = 0
        self.num_steps = 0
        self.info.startup_seconds = {"load": round(t_load - t0, 3), "cuda_graphs": round(capture_s, 3),
                                     "total": round(time.perf_counter() - t0, 3)}

    def _max_model_len(self, hf_config) -> int:
        limit = getattr(hf_config, "max_position_embeddings", None) or 2048
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True) and window < limit:
            limit = window  # no sliding-window attention here: stay within the window
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's limit ({limit})")
        return self.config.max_model_len

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = ModelRunner.kv_block_bytes(self.info, self.info.dtype)
        wanted = self.info.max_num_seqs * -(-self.info.max_model_len // self.info.block_size)
        if self.info.device.type == "cuda":
            free = self.runner.profile_free_memory(self.config.gpu_memory_utilization)
            blocks = int(free // block_bytes)
        else:
            blocks = min(int(self.config.cpu_kv_cache_gb * 2**30 // block_bytes), wanted)
        if blocks < 1:
            raise RuntimeError("no memory left for the KV cache: lower max_model_len or raise "
                               "gpu_memory_utilization")
        return blocks

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    stream: bool = False) -> None:
        """Validate and queue a request; raises ValueError naming the field at fault."""
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_token_ids, params)
        if max_tokens != params.max_tokens:
            params = params.clone(max_tokens=max_tokens)
        grammar = self.grammars.compile(params.structured_outputs) if params.structured_outputs else None
        seed = params.seed if params.seed is not None else self.rng.getrandbits(63)
        request = Request(request_id, list(prompt_token_ids), params, seed, stream, grammar=grammar)
        self.requests[request_id] = request
        self.scheduler.add_request(request)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        return validate_request(self.info, prompt_token_ids, params, self.config.max_logprobs)

    def abort_request(self, request_id: str) -> list[SeqUpdate]:
        """End a request; its samples report finish_reason "abort" with what they generated so far."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return []
        ended = self.scheduler.abort_request(request)
        self.runner.release(ended)
        return [self._update(seq) for seq in ended]

    def abort_all(self) -> list[SeqUpdate]:
        updates = []
        for request_id in list(self.requests):
            updates += self.abort_request(request_id)
        return updates

    def finish_sample(self, request_id: str, index: int, stop_reason: int | str | None = None) -> None:
        """The front end found a stop string: free that sample without reporting it again."""
        request = self.requests.get(request_id)
        if request is None or not request.is_forked or index >= len(request.seqs):
            return
        self.scheduler.finish_seq(request.seqs[index], SequenceStatus.FINISHED_STOPPED, stop_reason)
        self.runner.release([request.seqs[index]])
        if request.is_finished:
            del self.requests[request_id]

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- one step ----------------------------------------------------------------------------------
    def step(self) -> list[SeqUpdate]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched)
        touched = self.scheduler.update_from_output(sched, sampled, self.weight_version)
        self.num_steps += 1
        updates = [self._update(seq) for seq in touched if seq.request.stream or seq.status.is_finished]
        finished = [seq for seq in touched if seq.status.is_finished]
        self.runner.release(finished)
        for seq in finished:
            if seq.request.is_finished:
                self.requests.pop(seq.request.request_id, None)
        return updates

    def _update(self, seq: Sequence) -> SeqUpdate:
        start = seq.num_sent_tokens
        seq.num_sent_tokens = seq.num_output_tokens
        p = seq.params
        return SeqUpdate(
            request_id=seq.request.request_id, index=seq.sample_index,
            token_ids=seq.output_token_ids[start:],
            sampled_logprobs=seq.sampled_logprobs[start:] if p.logprobs is not None else None,
            top_logprobs=seq.top_logprobs[start:] if p.logprobs else None,
            finish_reason=seq.status.finish_reason, stop_reason=seq.stop_reason,
            weight_versions=list(seq.weight_versions), num_cached_tokens=seq.request.num_cached_tokens)

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
        self.model.load_weights(weights)
        self.weight_version = self.weight_version + 1 if new_version is None else new_version
        self.reset_prefix_cache()
        return self.weight_version

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks, "kv_blocks_free": bm.num_free_blocks,
            "kv_blocks_used": bm.num_blocks - bm.num_free_blocks,
            "prefix_cache_hit_tokens": bm.num_hit_tokens, "prefix_cache_queried_tokens": bm.num_queried_tokens,
            "num_preemptions": self.scheduler.num_preemptions, "num_steps": self.num_steps,
            "weight_version": self.weight_version,
        }
