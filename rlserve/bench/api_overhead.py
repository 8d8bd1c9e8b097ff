"""The API process's serial cost for one batch, on the CPU, without a model: ``python -m rlserve.bench.api_overhead``.

With data parallelism the replicas generate in parallel, but their outputs all pass through the one API
process: receiving and unpickling each replica's ``StepOutputs``, the ``OutputProcessor``, building TRL's
response and encoding it. That work is serial, so it bounds DP scaling (at DP=2 on rl-small a batch takes ~2 s
on H200s). This measures it by driving the real code: an ``EngineClient`` (server/replicas.py) whose replicas
are fake -- threads that answer the client's real ``AddRequests`` over the same ZMQ sockets (PULL in, PUSH out,
ipc://) with the finished ``SeqUpdate``s a real core would send for that workload (random token ids and
float32 logprobs from a fixed seed; every sample finishes in the same step, as with ``ignore_eos``). The
replicas pickle their messages before the clock starts (that is their process's work, not the API's), then
send them together; the clock stops when ``EngineClient.generate`` returns. The response is then built by the
route's own functions (routes_trl.trl_response / binary_response, or routes_openai.completions_response for
``--response_format openai``, the answer TRL >= 1.12 asks for) and encoded as the route does (orjson).

Stages (ms, median of ``--repeats``): ``admit+send`` (admission of the prompts, pickling the ``AddRequests``, until
the last replica holds its own), ``receive+unpickle`` (ZMQ receive, unpickling, dispatch), ``output
processing`` (``OutputProcessor.process`` and resolving the requests), ``response build``, ``serialise``.
What it does not include: the HTTP request's parsing and the socket write of the body (uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from rlserve.bench.bench import git_commit
from rlserve.config import EngineConfig
from rlserve.engine import messages as msg
from rlserve.outputs import TopLogprobs
from rlserve.sampling import SamplingParams
from rlserve.server import binary
from rlserve.server.replicas import EngineClient, Replica
from rlserve.server.routes_openai import completions_response
from rlserve.server.routes_trl import binary_response, trl_response
from rlserve.server.routing import json_response

VOCAB_SIZE = 151936  # Qwen2.5's, as in rl-small
REPLICA_TIMEOUT_S = 30.0


class FakeReplica:
    """A replica handle (as replica_handles.LocalReplica) whose engine is a thread: it reports ready, and answers
    each ``AddRequests`` with every sample finished. Two barriers keep the threads off the API's GIL while it works:
    they build their answers once every replica has its requests, and send once every answer is pickled."""

    remote = False

    def __init__(self, index: int, input_addr: str, output_addr: str, ctx: zmq.Context, new_tokens: int,
                 seed: int, received: threading.Barrier, go: threading.Barrier):
        self.index, self.new_tokens, self.seed, self.received, self.go = index, new_tokens, seed, received, go
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.connect(input_addr)
        self.outbox = ctx.socket(zmq.PUSH)
        self.outbox.connect(output_addr)
        self.sent_at: float | None = None
        self.received_at: float | None = None
        self.pickled_bytes = 0
        self.pickle_seconds = 0.0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, name=f"fake-replica{index}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.outbox.send_pyobj(msg.EngineReady(self.index, {
                "protocol": msg.PROTOCOL, "vocab_size": VOCAB_SIZE, "max_model_len": 32768,
                "kv_capacity_tokens": 10 ** 7, "hf_weight_shapes": {}}, os.getpid()))
            while not self.stop.is_set():
                if not self.inbox.poll(50):
                    continue
                m = self.inbox.recv_pyobj()
                if isinstance(m, msg.AddRequests):
                    self.received_at = time.perf_counter()
                    self.received.wait(REPLICA_TIMEOUT_S)  # no replica works while the API still sends to another
                    outputs = msg.StepOutputs(self.index, self.updates(m))
                    start = time.perf_counter()
                    frame = pickle.dumps(outputs, pickle.DEFAULT_PROTOCOL)  # as send_pyobj does
                    self.pickle_seconds = time.perf_counter() - start
                    self.pickled_bytes = len(frame)
                    self.go.wait(REPLICA_TIMEOUT_S)  # every replica's frame ready: the clock starts
                    self.sent_at = time.perf_counter()
                    self.outbox.send(frame, copy=False)
                elif isinstance(m, msg.Shutdown):
                    return
        except BaseException as e:  # reported by the caller; a broken barrier frees the others
            self.error = e
            self.received.abort()
            self.go.abort()
        finally:
            self.inbox.close(0)
            self.outbox.close(0)

    def updates(self, m: msg.AddRequests) -> list[msg.SeqUpdate]:
        """What a core sends for these requests once every sample hit max_tokens: one ``SeqUpdate`` per sample
        with all its tokens (Python ints) and, when asked, logprobs (Python floats that are float32 values, as
        the sampler's ``tolist()`` gives) and the top N ([T, N] int32 and float32 arrays)."""
        updates = []
        for r in m.requests:
            p = r.params
            rng = np.random.default_rng([self.seed, int(r.request_id.rsplit("-", 1)[1])])
            for i in range(p.n):
                tokens = rng.integers(0, VOCAB_SIZE, self.new_tokens).tolist()
                sampled = top = None
                if p.logprobs is not None:
                    sampled = (-rng.exponential(2.0, self.new_tokens)).astype(np.float32)
                if p.logprobs:  # [T, N] by rank, the sampled token first (as when it is the most likely)
                    ids = np.empty((self.new_tokens, p.logprobs), np.int32)
                    ids[:, 0] = tokens
                    ids[:, 1:] = rng.integers(0, VOCAB_SIZE, (self.new_tokens, p.logprobs - 1))
                    top = TopLogprobs(ids, sampled[:, None] - 1.0 - np.arange(p.logprobs, dtype=np.float32))
                    top.logprobs[:, 0] = sampled
                if sampled is not None:
                    sampled = sampled.tolist()
                updates.append(msg.SeqUpdate(r.request_id, i, tokens, sampled, top, finish_reason="length",
                                             weight_versions=[0], num_cached_tokens=len(r.prompt_token_ids)))
        return updates

    # -- the handle interface EngineClient uses --------------------------------------------------
    def describe(self) -> dict:
        return {"fake": True}

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def exit_reason(self) -> str:
        return f"fake replica stopped ({self.error!r})"

    def kill(self) -> None:
        self.stop.set()

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)


class FakeEngineClient(EngineClient):
    """The real client with fake replicas: only ``_launch`` differs."""

    def __init__(self, data_parallel_size: int, new_tokens: int, seed: int):
        super().__init__(EngineConfig(model="fake"), data_parallel_size, tokenizer=None)
        self.sync_ctx = zmq.Context()
        self.new_tokens, self.seed = new_tokens, seed
        self.received = threading.Barrier(data_parallel_size)
        self.go = threading.Barrier(data_parallel_size)

    def _launch(self, index: int, generation: int = 0) -> Replica:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        addr = self._bind(sock, f"in{index}-{generation}")
        handle = FakeReplica(index, addr, self.output_addr, self.sync_ctx, self.new_tokens, self.seed, self.received,
                             self.go)
        return Replica(index, handle, sock, generation=generation)

    async def shutdown(self, timeout_s: float = 5.0) -> None:
        await super().shutdown(timeout_s)  # sends each replica a Shutdown, and kills one that stays
        for r in self.replicas:
            r.handle.join(timeout_s)
        self.sync_ctx.destroy(linger=0)


class TimedProcessor:
    """Wraps the client's ``OutputProcessor.process`` and ``_resolve`` to add up the time spent in them."""

    def __init__(self, client: EngineClient):
        self.seconds = 0.0
        client.processor.process = self._timed(client.processor.process)
        client._resolve = self._timed(client._resolve)

    def _timed(self, fn):
        def timed(arg):
            start = time.perf_counter()
            try:
                return fn(arg)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


async def _one_batch(client: EngineClient, timer: TimedProcessor, prompts, params: SamplingParams,
                     response_format: str, batch: int) -> dict:
    timer.seconds = 0.0
    client.received.reset()
    client.go.reset()
    called = time.perf_counter()
    outputs = await client.generate(prompts, params, detokenize=False, request_id=f"b{batch}")
    done = time.perf_counter()
    sent = min(r.handle.sent_at for r in client.replicas)
    if response_format == "openai":  # TRL >= 1.12's request: /v1/completions, token ids as names
        def layout(outputs, _params):
            return completions_response(None, outputs, "fake", as_ids=True, return_token_ids=True)
    else:
        layout = binary_response if response_format == "binary" else trl_response
    with binary.gc_paused():  # as routes_trl.run_generation
        start = time.perf_counter()
        payload = layout(outputs, params)
        built = time.perf_counter()
        body = json_response(payload).body
        encoded = time.perf_counter()
    receive = done - sent - timer.seconds
    admitted = max(r.handle.received_at for r in client.replicas) - called
    return {"admit_send_ms": admitted * 1e3, "receive_unpickle_ms": receive * 1e3,
            "output_processing_ms": timer.seconds * 1e3,
            "response_build_ms": (built - start) * 1e3, "serialise_ms": (encoded - built) * 1e3,
            "total_ms": (admitted + done - sent + encoded - start) * 1e3, "response_bytes": len(body),
            "message_bytes": sum(r.handle.pickled_bytes for r in client.replicas),
            # each replica's own work, in parallel and outside the API process: not in total_ms
            "replica_pickle_ms": max(r.handle.pickle_seconds for r in client.replicas) * 1e3}


async def _measure(prompts: int, n: int, new_tokens: int, logprobs: int | None, response_format: str,
                   replicas: int, repeats: int, seed: int, prompt_len: int) -> list[dict]:
    client = FakeEngineClient(replicas, new_tokens, seed)
    await client.start(timeout_s=REPLICA_TIMEOUT_S)
    timer = TimedProcessor(client)
    rng = np.random.default_rng(seed)
    batch = [(None, rng.integers(0, VOCAB_SIZE, prompt_len).tolist()) for _ in range(prompts)]
    params = SamplingParams(n=n, max_tokens=new_tokens, logprobs=logprobs, ignore_eos=True, seed=seed)
    try:
        runs = []
        for i in range(repeats + 1):  # the first is a warm-up
            runs.append(await asyncio.wait_for(_one_batch(client, timer, batch, params, response_format, i),
                                               REPLICA_TIMEOUT_S * 4))
        return runs[1:]
    finally:
        await client.shutdown()


STAGES = ("admit_send_ms", "receive_unpickle_ms", "output_processing_ms", "response_build_ms", "serialise_ms",
          "total_ms")


def measure(prompts: int = 64, n: int = 8, new_tokens: int = 512, logprobs: int | None = 0,
            response_format: str = "json", replicas: int = 2, repeats: int = 5, seed: int = 0,
            prompt_len: int = 128, batch_seconds: float = 2.0, output: str | None = None,
            quiet: bool = False) -> dict:
    """Median per stage over ``repeats`` batches (after one warm-up); the serial part as a fraction of a
    ``batch_seconds`` batch (rl-small at DP=2 on H200s: ~2 s)."""
    if min(prompts, n, new_tokens, replicas, repeats) < 1:
        raise ValueError("prompts, n, tokens, replicas and repeats must be >= 1")
    if prompts < replicas:  # each fake replica waits for its share of the batch
        raise ValueError(f"prompts ({prompts}) must be >= replicas ({replicas})")
    runs = asyncio.run(_measure(prompts, n, new_tokens, logprobs, response_format, replicas, repeats, seed,
                                prompt_len))
    median = {k: statistics.median(r[k] for r in runs) for k in STAGES + ("replica_pickle_ms",)}
    total_s = median["total_ms"] / 1e3
    result = {"what": "API process serial cost per batch (CPU, no model)", "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "prompts": prompts, "n": n, "new_tokens": new_tokens, "logprobs": logprobs,
              "response_format": response_format, "replicas": replicas, "repeats": repeats, "seed": seed,
              "median": median, "runs": runs, "response_bytes": runs[0]["response_bytes"],
              "message_bytes": runs[0]["message_bytes"], "batch_seconds": batch_seconds,
              "serial_fraction_of_batch": total_s / batch_seconds,
              # DP scaling if the replicas' generation ends at batch_seconds and the serial part follows it
              "dp_speedup_bound": (batch_seconds * replicas + total_s) / (batch_seconds + total_s)}
    if not quiet:
        print(f"API process, one batch: {prompts} prompts x n={n} x {new_tokens} tokens, logprobs={logprobs}, "
              f"{response_format}, {replicas} fake replica(s); median of {repeats} ({result['cpu']}, "
              f"{os.cpu_count()} cpus)")
        print(f"{'stage':<22}{'ms':>10}")
        for k in STAGES:
            print(f"{k[:-3].replace('_', ' '):<22}{median[k]:>10.1f}")
        print(f"(each replica, in parallel: pickling its outputs {median['replica_pickle_ms']:.1f} ms)")
        print(f"replica messages {result['message_bytes'] / 1e6:.1f} MB pickled, response "
              f"{result['response_bytes'] / 1e6:.1f} MB")
        print(f"serial part = {result['serial_fraction_of_batch']:.1%} of a {batch_seconds:g} s batch; DP={replicas} "
              f"speedup bound {result['dp_speedup_bound']:.2f}x (if each replica's share took {batch_seconds:g} s)")
    path = Path(output or "bench_results/api-overhead.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512, help="new tokens per sample")
    p.add_argument("--logprobs", type=int, default=0, help="-1: none (logprobs=None)")
    p.add_argument("--response_format", choices=("json", "binary", "openai"), default="json",
                   help="openai: the /v1/completions answer TRL >= 1.12 asks for (its text is empty here: the fake "
                        "replicas' outputs are not detokenized)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_seconds", type=float, default=2.0, help="a DP batch's generation time, for the fraction")
    p.add_argument("--output", default=None, help="JSON path (default bench_results/api-overhead.json)")
    a = p.parse_args(argv)
    return measure(a.prompts, a.n, a.tokens, None if a.logprobs < 0 else a.logprobs, a.response_format, a.replicas,
                   a.repeats, a.seed, batch_seconds=a.batch_seconds, output=a.output)


if __name__ == "__main__":
    main()
