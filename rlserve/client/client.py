"""What a trainer imports: ``rlserve.Client``, with the method names of TRL's ``VLLMClient``.

HTTP for control and generation; a process group of its own (never the trainer's default group) for weight
tensors. Migrating from TRL is the import line::

    from rlserve import Client as VLLMClient
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from typing import Iterable
from urllib.parse import urlparse

import httpx
import numpy as np
import orjson
import torch
from torch import nn

from rlserve.distributed.weight_sync import (GroupSpec, WeightSyncGroup, pack_for_send, parse_dtype, plan_buckets,
                                             send_buckets, send_streamed)
from rlserve.server import binary
from rlserve.server.schemas import ChatRequest, GenerateRequest, SequenceLogprobsRequest

logger = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server answered with an error status; ``status`` and ``message`` say which and why."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


def _no_images(images, features) -> None:
    if features is not None and any(f is not None for f in features) or \
            images is not None and any(i for i in images):
        raise NotImplementedError("rlserve serves text models: images are not supported")


def _decoded(answer: dict, binary_response: bool, as_arrays: bool, logprobs: int | None,
             generation_kwargs: dict | None) -> dict:
    """A /generate/ or /chat/ answer as asked: JSON as it came, a binary one as TRL's dict or as arrays."""
    if not (binary_response or as_arrays):
        return answer
    asked = (generation_kwargs or {}).get("logprobs", logprobs)  # the server lets generation_kwargs win
    return binary.decode(answer, as_arrays, asked if isinstance(asked, int) else None)


def _tool_schema(tool) -> dict:
    if callable(tool):
        from transformers.utils import get_json_schema
        return get_json_schema(tool)
    return tool


class Client:
    def __init__(self, base_url: str | None = None, host: str = "0.0.0.0", server_port: int = 8000,
                 group_port: int = 51216, connection_timeout: float = 0.0, request_timeout: float = 3600.0,
                 api_key: str | None = None):
        """``api_key``: sent as ``Authorization: Bearer <key>`` on every request; default $RLSERVE_API_KEY,
        else $VLLM_API_KEY (the variables ``rlserve serve`` reads), else none."""
        if base_url is not None:
            parsed = urlparse(base_url)
            self.host = parsed.hostname or "127.0.0.1"
            self.server_port = parsed.port or 80
            self.base_url = base_url.rstrip("/")
        else:
            self.host, self.server_port = host, server_port
            self.base_url = f"http://{host}:{server_port}"
        self.group_port = group_port
        self.request_timeout = request_timeout
        # Retries cover failures to connect only: a request that reached the server is never sent twice.
        if api_key is None:
            api_key = os.environ.get("RLSERVE_API_KEY") or os.environ.get("VLLM_API_KEY") or None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=request_timeout, headers=self.headers,
                                 transport=httpx.HTTPTransport(retries=3))
        self.communicator: WeightSyncGroup | None = None
        self.weight_version = 0
        self.check_server(connection_timeout)

    # -- plumbing ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, json: dict | None = None, timeout: float | None = None) -> dict:
        response = self.http.request(method, path, json=json, timeout=timeout or self.request_timeout)
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except Exception:
                message = response.text
            raise ServerError(response.status_code, message)
        with binary.gc_paused():  # a generation answer is ~10 MB of small lists
            return orjson.loads(response.content)

    def check_server(self, total_timeout: float = 0.0, retry_interval: float = 2.0) -> None:
        """Wait until /health/ answers 200, up to ``total_timeout`` seconds; ConnectionError after that."""
        deadline = time.monotonic() + total_timeout
        while True:
            try:  # one probe, no transport retries, never past the deadline (by more than a second)
                timeout = min(10.0, max(deadline - time.monotonic(), 1.0))
                if httpx.get(self.base_url + "/health/", timeout=timeout, headers=self.headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                raise ConnectionError(f"the rlserve server at {self.base_url} is not up after {total_timeout}s; "
                                      f"start it with `rlserve serve --model ...`")
            time.sleep(min(retry_interval, max(deadline - time.monotonic(), 0.05)))

    # -- generation --------------------------------------------------------------------------------
    def generate(self, prompts: list[str] | list[list[int]], images: list | None = None, n: int = 1,
                 repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
                 min_p: float = 0.0, max_tokens: int = 16, logprobs: int | None = 0,
                 structured_outputs_regex: str | None = None, generation_kwargs: dict | None = None,
                 truncate_prompt_tokens: int | None = None, guided_decoding_regex: str | None = None,
                 features: list | None = None, timeout: float | None = None, binary_response: bool = False,
                 as_arrays: bool = False) -> dict:
        """TRL's dict: prompt_ids, completion_ids (len(prompts) * n, grouped by prompt), logprobs and
        logprob_token_ids (per token: the sampled token, or the top N+1 sorted; None for logprobs=None).
        Takes every argument TRL's trainers pass (1.0-1.16); images are not supported. ``binary_response``:
        fetch ids and logprobs as numpy arrays (rlserve/server/binary.py) and return the same dict; faster
        for RL batches, which are ~10 MB as JSON. ``as_arrays`` (implies ``binary_response``): keep them as
        numpy arrays, one per sequence, for a trainer that makes tensors of them: no Python list per token to
        build. The same keys, plus ``sampled_logprobs[i]`` (tokens,), the sampled tokens' logprobs; ``logprobs[i]``
        is (tokens, logprobs + 1) for logprobs > 0, padded with NaN where ``logprob_token_ids[i]`` is -1
        (``binary.decode_arrays``)."""
        _no_images(images, features)
        body = GenerateRequest(prompts=prompts, n=n, repetition_penalty=repetition_penalty,
                               temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                               max_tokens=max_tokens, logprobs=logprobs,
                               structured_outputs_regex=structured_outputs_regex or guided_decoding_regex,
                               truncate_prompt_tokens=truncate_prompt_tokens,
                               generation_kwargs=generation_kwargs or {},
                               response_format="binary" if binary_response or as_arrays else "json")
        answer = self._request("POST", "/generate/", body.model_dump(exclude_none=False), timeout)
        return _decoded(answer, binary_response, as_arrays, logprobs, generation_kwargs)

    def chat(self, messages: list[list[dict]], n: int = 1, repetition_penalty: float = 1.0,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
             max_tokens: int = 16, logprobs: int | None = 0, structured_outputs_regex: str | None = None,
             generation_kwargs: dict | None = None, chat_template_kwargs: dict | None = None,
             tools: list | None = None, chat_template: str | None = None, max_concurrent_requests: int = 64,
             timeout: float | None = None, binary_response: bool = False, as_arrays: bool = False) -> dict:
        """TRL's chat call. ``chat_template``: a template other than the model's is not supported (it is a
        server-side setting); ``max_concurrent_requests`` does not apply (one request carries them all).
        ``binary_response`` and ``as_arrays`` as in ``generate``."""
        if chat_template is not None:
            raise NotImplementedError("rlserve renders the model's own chat template; chat_template is not supported")
        body = ChatRequest(messages=messages, n=n, repetition_penalty=repetition_penalty, temperature=temperature,
                           top_p=top_p, top_k=top_k, min_p=min_p, max_tokens=max_tokens, logprobs=logprobs,
                           structured_outputs_regex=structured_outputs_regex,
                           generation_kwargs=generation_kwargs or {}, chat_template_kwargs=chat_template_kwargs,
                           tools=[_tool_schema(t) for t in tools] if tools else None,
                           response_format="binary" if binary_response or as_arrays else "json")
        answer = self._request("POST", "/chat/", body.model_dump(), timeout)
        return _decoded(answer, binary_response, as_arrays, logprobs, generation_kwargs)

    def image_features(self, images, max_concurrent_requests: int = 64):
        _no_images(images, None)
        return [None] * len(images)

    def get_server_info(self) -> dict:
        """vLLM's config tree, as TRL >= 1.12 reads it (``weight_transfer_config``, ``model_config``...)."""
        return self._request("GET", "/server_info/", None)["vllm_config"]

    def get_sequence_logprobs(self, sequences: list[list[int]], prompt_lengths: list[int], top_logprobs: int = 100,
                              temperature: float = 1.0, use_binary: bool = True, chunk_size: int = 0,
                              max_concurrent_requests: int = 4, timeout: float | None = None) -> dict:
        """TRL's teacher scoring: per sequence, per completion position (from its prompt length on), the top
        ``top_logprobs`` logprobs and token ids by rank ([completion length][top_logprobs], padded with -inf / 0
        where a position has no distribution) and the actual token's (``actual_logprobs``, ``actual_token_ids``:
        [completion length][1]). Fetched as binary arrays; lists, as TRL's client returns them. TRL's
        ``use_binary``/``chunk_size``/``max_concurrent_requests`` are accepted: one request carries the batch, and
        the server splits it into chunks of its own."""
        body = SequenceLogprobsRequest(sequences=sequences, prompt_lengths=prompt_lengths, top_logprobs=top_logprobs,
                                       temperature=temperature, response_format="binary")
        answer = self._request("POST", "/get_sequence_logprobs/", body.model_dump(), timeout)
        batch, length, k = answer["shape"]
        result = {}
        for key, field, dtype, width in (("logprobs", "logprobs_b64", np.float32, k),
                                         ("logprob_token_ids", "token_ids_b64", np.int32, k),
                                         ("actual_logprobs", "actual_logprobs_b64", np.float32, 1),
                                         ("actual_token_ids", "actual_token_ids_b64", np.int32, 1)):
            array = np.frombuffer(base64.b64decode(answer[field]), dtype=dtype).reshape(batch, length, width)
            result[key] = [array[i, :n].tolist() for i, n in enumerate(answer["completion_lengths"])]
        return result

    def get_world_size(self) -> int:
        return self._request("GET", "/get_world_size/")["world_size"]

    def reset_prefix_cache(self) -> None:
        self._request("POST", "/reset_prefix_cache/")

    def server_info(self) -> dict:
        return self._request("GET", "/server_info/")

    def pause(self, mode: str = "abort") -> None:
        self._request("POST", "/pause/", {"mode": mode})

    def resume(self) -> None:
        self._request("POST", "/resume/")

    # -- weight sync -------------------------------------------------------------------------------
    def init_communicator(self, device: torch.device | str | int = "cuda", timeout_s: float = 120.0) -> None:
        """Join the server's weight-sync group as its last rank (vLLM's rendezvous, as TRL's client does): NCCL
        from a CUDA device, gloo (through host memory) from the CPU -- also the way to reach a server on a GPU
        this process uses. A previous group of this client, or of a crashed trainer, is replaced."""
        if self.communicator is not None:
            self.close_communicator()
        device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        world_size = self.get_world_size() + 1
        backend = "nccl" if device.type == "cuda" else "gloo"
        self._request("POST", "/init_communicator/", {
            "host": "0.0.0.0", "port": self.group_port, "world_size": world_size, "timeout_s": timeout_s,
            "backend": backend,
            "client_device_uuid": str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda"
            else None})
        spec = GroupSpec(host=self.host, port=self.group_port, world_size=world_size, trainer_rank=world_size - 1,
                         backend=backend, timeout_s=timeout_s)
        group = WeightSyncGroup(spec, world_size - 1, device)
        group.warm_up()
        self.communicator = group

    def _require_communicator(self) -> WeightSyncGroup:
        if self.communicator is None:
            raise RuntimeError("call init_communicator() first")
        return self.communicator

    def update_named_param(self, name: str, weights: torch.Tensor) -> None:
        """TRL's per-tensor update: announce, broadcast, wait until every worker loaded it. A run of these is
        one weight version, which holds from the next generation request or ``reset_prefix_cache``."""
        group = self._require_communicator()
        self._request("POST", "/update_named_param/",
                      {"name": name, "dtype": str(weights.dtype), "shape": list(weights.shape)})
        tensor = weights.detach().to(group.device).contiguous()
        group.broadcast(tensor)
        group.barrier()

    def update_named_params(self, metadata: list, named_params: Iterable[tuple[str, torch.Tensor]],
                            bucket_size_mb: float = 512) -> int:
        """TRL >= 1.12's call: ``metadata`` announces every tensor ((name, dtype, shape), in order), then
        ``named_params`` yields them one at a time -- each is copied into its bucket as it comes (TRL's iterator
        may gather a sharded parameter, or merge adapters, only for the time of its yield)."""
        group = self._require_communicator()
        buckets = plan_buckets(((name, parse_dtype(dtype), tuple(shape)) for name, dtype, shape in metadata),
                               int(bucket_size_mb * 2**20))
        answer = self._request("POST", "/update_weights/", {"buckets": [b.to_dict() for b in buckets]})
        send_streamed(group, buckets, named_params)
        group.barrier()
        self.weight_version = answer["version"]
        return self.weight_version

    @contextlib.contextmanager
    def weight_update(self):
        """TRL >= 1.12 groups its updates in this context; each rlserve update is already atomic."""
        yield

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_size_mb: float = 512) -> int:
        """Push many tensors at once, in flat buckets of ``bucket_size_mb``; returns the new weight version.
        The server validates all names, shapes and dtypes before any byte moves."""
        group = self._require_communicator()
        tensors = {name: t.detach() for name, t in named_tensors}
        buckets = plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()),
                               int(bucket_size_mb * 2**20))
        first = pack_for_send(group, buckets, tensors, 0) if buckets else None  # on the GPU during the HTTP call
        answer = self._request("POST", "/update_weights/", {"buckets": [b.to_dict() for b in buckets]})
        send_buckets(group, buckets, tensors, first)
        group.barrier()
        self.weight_version = answer["version"]
        return self.weight_version

    def update_model_params(self, model: nn.Module, bucket_size_mb: float = 512) -> int:
        """Push every parameter of a model with Hugging Face names (tied embeddings travel once)."""
        return self.update_weights(((name, p.data) for name, p in model.named_parameters()), bucket_size_mb)

    def close_communicator(self) -> None:
        try:
            self._request("POST", "/close_communicator/")
        finally:
            if self.communicator is not None:
                self.communicator.close()
                self.communicator = None

    def close(self) -> None:
        if self.communicator is not None:
            try:
                self.close_communicator()
            except Exception:
                pass
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


VLLMClient = Client  # the name TRL users know
