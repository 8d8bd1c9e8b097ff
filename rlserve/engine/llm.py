"""Offline generation: ``LLM(model).generate(prompts, params)``, the engine in this process.

The counterpart of vLLM's ``LLM`` class for scripts, tests and trainers that keep generation on their own
GPU. The server runs the same engine core in other processes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import Any, Sequence

import torch

from rlserve.config import EngineConfig
from rlserve.engine.validation import InvalidRequest, admit
from rlserve.engine.output_processor import OutputProcessor
from rlserve.outputs import RequestOutput
from rlserve.sampling import SamplingParams
from rlserve.tokenizer import load_tokenizer, render_chat


class LLM:
    def __init__(self, model: str, revision: str | None = None, dtype: str = "auto", tensor_parallel_size: int = 1,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.9, device: str | None = None, seed: int | None = 0,
                 enforce_eager: bool = False, **engine_kwargs: Any):
        # $RLSERVE_FUSED=0 (the benchmarks' before/after switch) is read here, at the edge, as by `rlserve serve`.
        engine_kwargs.setdefault("fused_kernels", os.environ.get("RLSERVE_FUSED", "1") != "0")
        self.config = EngineConfig(
            model=model, revision=revision, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len, enable_prefix_caching=enable_prefix_caching,
            gpu_memory_utilization=gpu_memory_utilization, device=device, seed=seed, enforce_eager=enforce_eager,
            **engine_kwargs)
        from rlserve.engine.executor import make_engine
        device = self.config.resolved_device()
        # Loading makes the engine's device current (the server's processes keep it so); this context gives the
        # caller's thread its own back: LLM(device="cuda:1") leaves a trainer on cuda:0 where it was.
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            self.engine = make_engine(self.config)
        self.tokenizer = load_tokenizer(self.engine.model_dir, revision)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._is_shut_down = False

    @property
    def info(self):
        return self.engine.info

    def get_tokenizer(self):
        return self.tokenizer

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 detokenize: bool = True) -> list[RequestOutput]:
        """``prompts``: a string, a list of strings, a list of token ids, a list of token-id lists, or dicts
        with "prompt" or "prompt_token_ids". One SamplingParams for all, or one per prompt."""
        self._check_open()
        items = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"sampling_params has {len(params_list)} entries for {len(items)} prompts")
        limits = self.engine.limits
        admitted = []
        for i, ((_, ids), params) in enumerate(zip(items, params_list)):
            try:
                admitted.append(admit(limits, ids, params))
            except InvalidRequest as e:  # the same error, its message naming the prompt
                raise InvalidRequest(e.field, f"prompts[{i}]: {e.message}", e.value, e.limit) from None
        order = []
        for (text, ids), params in zip(items, admitted):
            request_id = str(next(self._ids))
            self.engine.add_request(request_id, ids, params)
            self.processor.add_request(request_id, text, ids, params, detokenize)
            order.append(request_id)
        return self._run(order)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template_kwargs: dict | None = None, tools: list | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """``messages``: one conversation (a list of {"role", "content"} dicts) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.render_chat(c, chat_template_kwargs, tools, add_generation_prompt)}
                   for c in conversations]
        return self.generate(prompts, sampling_params)

    def render_chat(self, conversation: list[dict], chat_template_kwargs: dict | None = None,
                    tools: list | None = None, add_generation_prompt: bool = True) -> list[int]:
        return render_chat(self.tokenizer, conversation, chat_template_kwargs, tools, add_generation_prompt)

    def _normalize_prompts(self, prompts) -> list[tuple[str | None, list[int]]]:
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                p = p.get("prompt_token_ids", p.get("prompt"))
            if isinstance(p, str):
                items.append((p, self.tokenizer(p).input_ids))
            elif isinstance(p, (list, tuple)):
                items.append((None, list(p)))
            else:
                raise ValueError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
        return items

    def _on_device(self):
        """The engine's CUDA device as the calling thread's current one: CUDA's current device is per thread (a new
        thread starts on device 0), and Triton launches, CUDA-graph replays and events use the current device's
        stream. An LLM on cuda:1 built in one thread and called from another would otherwise launch on cuda:0."""
        device = self.engine.info.device
        return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

    def _run(self, order: list[str]) -> list[RequestOutput]:
        with self._on_device():
            return self._run_on_device(order)

    def _run_on_device(self, order: list[str]) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for update in self.engine.step():
                    try:
                        done = self.processor.process(update)
                    except Exception as e:  # e.g. detokenizing: this request fails alone
                        done = self._fail(update.request_id, f"{type(e).__name__}: {e}")
                    if done is not None:
                        results[done.request_id] = done.to_output()
        except BaseException:
            for update in self.engine.abort_all():
                self.processor.process(update)
            raise
        return [results[r] for r in order]

    def _fail(self, request_id: str, message: str):
        """End a request whose output could not be processed: its unfinished samples report finish reason
        "error" (stop_reason: the message), with the tokens they had; the engine frees them."""
        self.engine.abort_request(request_id)
        state = self.processor.states.pop(request_id, None)
        if state is not None:
            for out in state.outputs:
                if not out.finished:
                    out.finish_reason, out.stop_reason = "error", message
        return state

    # -- engine control ----------------------------------------------------------------------------
    def reset_prefix_cache(self) -> None:
        with self._on_device():
            self.engine.reset_prefix_cache()

    def _check_open(self) -> None:
        if self._is_shut_down:
            raise RuntimeError("this LLM was shut down; make a new one")

    def load_weights(self, weights) -> int:
        """Load Hugging Face-named tensors into the engine; returns the new weight version."""
        self._check_open()
        weights = list(weights)
        self.engine.validate_weights([(n, t.dtype, tuple(t.shape)) for n, t in weights])
        with self._on_device():
            return self.engine.load_weights(weights)

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        """Give back the GPU memory (weights, KV cache, graphs) now, and stop tensor-parallel worker processes, if
        any; garbage collection does it too, later. The LLM is unusable after it."""
        self._is_shut_down = True
        with self._on_device():
            self.engine.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
