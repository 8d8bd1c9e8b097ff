"""``rlserve bench --through_server``: the workload through a real HTTP server beside the offline engine, with
the answer in JSON (TRL's layout) and in the binary layout (rlserve/server/binary.py), both timed up to the
client holding TRL's dict, and the binary layout again up to the client holding numpy arrays (``as_arrays``);
a codec measurement of an RL-batch-sized answer without the model; and a load generator (``--concurrency C``)
reporting throughput, latency percentiles and failures. Every timed run starts on a cold prefix cache: the warm-up
uses prompts of another seed and the cache is reset before each run."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import fields
from pathlib import Path

import httpx
import orjson
import torch

from rlserve.bench.bench import device_name, git_commit, prepare_model, run_rlserve
from rlserve.bench.workloads import MODES, WARM_UP_SEED, WARM_UP_TOKENS, Workload, get_workload
from rlserve.server import binary
from rlserve.server.process import ServerProcess


def bench_server_args(device: torch.device, random_weights: bool, dp: int, tp: int,
                      extra: list[str] | None = None) -> list[str]:
    """A benchmark server's flags: its device and parallel sizes, random weights for models not on disk, then the
    caller's (which win)."""
    args = ["--device", str(device), "--data_parallel_size", str(dp), "--tensor_parallel_size", str(tp)]
    if random_weights:
        args += ["--load_format", "dummy", "--dtype", "bfloat16"]
    return args + list(extra or [])


def start_bench_server(model_dir: Path, device: torch.device, random_weights: bool, dp: int, tp: int,
                       extra: list[str] | None = None) -> ServerProcess:
    return ServerProcess(str(model_dir), *bench_server_args(device, random_weights, dp, tp, extra),
                         startup_timeout=900, poll_s=0.5)


def _payloads(workload: Workload, logprobs: int | None, response_format: str = "json",
              seed: int = 0) -> list[dict]:
    """One /generate/ request per distinct max_tokens (one in all for fixed-length workloads); ``seed`` picks
    the prompts (the warm-up uses another one than the timed runs)."""
    groups: dict[int, list] = {}
    for prompt, m in zip(workload.prompts(seed), workload.max_tokens_per_prompt()):
        groups.setdefault(m, []).append(prompt)
    return [{"prompts": prompts, "n": workload.n, "temperature": 1.0, "top_p": 1.0, "max_tokens": m,
             "logprobs": logprobs, "generation_kwargs": {"ignore_eos": True}, "response_format": response_format}
            for m, prompts in groups.items()]


# Each timed layout: what the server is asked for, and whether the client decodes it into numpy arrays.
LAYOUTS = {"json": ("json", False), "binary": ("binary", False), "arrays": ("binary", True)}
RESULT_KEYS = {"json": "server", "binary": "server_binary", "arrays": "server_arrays"}


def _decode(content: bytes, as_arrays: bool = False) -> dict:
    """TRL's dict from an answer in either layout, as ``rlserve.Client.generate`` returns it; ``as_arrays``: a binary
    answer's arrays (``Client.generate(..., as_arrays=True)``)."""
    with binary.gc_paused():
        answer = orjson.loads(content)
        return binary.decode(answer, as_arrays) if answer.get("format") == binary.FORMAT else answer


def server_timing(header: str | None) -> dict[str, float]:
    """``{"generate": seconds, "build": seconds}`` from a ``Server-Timing`` header (W3C: ``name;dur=ms, ...``)."""
    timings = {}
    for metric in (header or "").split(","):
        name, _, rest = metric.strip().partition(";")
        for param in rest.split(";"):
            key, _, value = param.strip().partition("=")
            if key == "dur" and name:
                try:
                    timings[name] = float(value) / 1e3
                except ValueError:  # a proxy's metric, not ours: skipped
                    pass
    return timings


async def _post_all(url: str, payloads: list[dict], reset_cache: bool = True,
                    parts: dict | None = None, as_arrays: bool = False) -> tuple[float, int]:
    """Seconds from sending the requests to holding every answer decoded to TRL's dict, and the tokens.
    ``parts``, when given and there is one request (with several, one's decoding overlaps another's time on the
    server), is filled with where the time went: the server's own ``generate`` (admission to the last output) and
    ``build`` (answer built and serialised) from its Server-Timing header, and the client's decoding."""
    async with httpx.AsyncClient(timeout=3600) as client:
        if reset_cache:  # outside the timed window
            (await client.post(url + "/reset_prefix_cache/")).raise_for_status()
        before = await _replica_counters(client, url) if parts is not None else None
        start = time.perf_counter()
        server, decode_s = [], 0.0

        async def one(payload):
            nonlocal decode_s
            r = await client.post(url + "/generate/", json=payload)
            r.raise_for_status()
            server.append(server_timing(r.headers.get("server-timing")))
            t0 = time.perf_counter()
            answer = _decode(r.content, as_arrays)
            decode_s += time.perf_counter() - t0
            return answer

        answers = await asyncio.gather(*(one(p) for p in payloads))
        seconds = time.perf_counter() - start
        if before is not None:  # where each replica's time went during the run: inside its steps, in its GC
            after = await _replica_counters(client, url)
            parts["replicas"] = [{k: a[k] - b[k] for k in a if k != "replica"} | {"replica": a["replica"]}
                                 for b, a in zip(before, after)]
    if parts is not None and len(server) == 1 and {"generate", "build"} <= server[0].keys():
        parts.update(server_generate_s=server[0]["generate"], server_build_s=server[0]["build"],
                     client_decode_s=decode_s)
        parts["http_and_rest_s"] = seconds - sum(v for v in parts.values() if isinstance(v, float))
    tokens = sum(len(ids) for a in answers for ids in a["completion_ids"])
    return seconds, tokens


async def _replica_counters(client, url: str) -> list[dict]:
    """Each replica's cumulative steps, seconds inside them, seconds stopped in the cyclic GC and its passes per
    generation (a full, generation-2, pass walks every live sequence's lists)."""
    r = await client.get(url + "/server_info/")
    r.raise_for_status()
    return [{"replica": rep["replica"], "steps": rep.get("num_steps", 0), "step_s": rep.get("step_seconds_total", 0.0),
             "gc_s": sum(rep.get("gc_seconds", []) or [0.0]),
             **{f"gc{g}_passes": n for g, n in enumerate(rep.get("num_gc_collections", [0, 0, 0]))}}
            for rep in r.json()["replicas"]]


def _float32_values(rng, count: int) -> list[float]:
    """Logprob-like values that are exact float32s, as the engine's are."""
    import numpy as np
    return np.array([-rng.expovariate(1.0) for _ in range(count)], dtype=np.float32).tolist()


def codec_bench(num_sequences: int = 512, length: int = 512, repeats: int = 3) -> dict:
    """Server-side encoding plus client-side decoding of one answer of ``num_sequences`` completions of
    ``length`` tokens with logprobs=0 (rl-small's batch by default), JSON against binary, no model: the cost
    the layout itself adds to an RL batch. Best of ``repeats``."""
    import random

    from rlserve.outputs import CompletionOutput, RequestOutput
    from rlserve.sampling import SamplingParams
    from rlserve.server.routes_trl import binary_response, trl_response
    rng = random.Random(0)
    n = 8
    outputs = [RequestOutput(str(i), None, [rng.randrange(32000) for _ in range(128)],
                             [CompletionOutput(j, [rng.randrange(150000) for _ in range(length)],
                                               finish_reason="length", sampled_logprobs=_float32_values(rng, length))
                              for j in range(n)]) for i in range(num_sequences // n)]
    params = SamplingParams(n=n, max_tokens=length, logprobs=0)
    result = {"sequences": num_sequences, "tokens_per_sequence": length}
    for name, layout in (("json", trl_response), ("binary", binary_response)):
        encode_s, decode_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            with binary.gc_paused():  # as run_generation does
                body = orjson.dumps(layout(outputs, params))
            encode_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            _decode(body)
            decode_s.append(time.perf_counter() - start)
        result[name] = {"bytes": len(body), "server_encode_s": min(encode_s), "client_decode_s": min(decode_s),
                        "total_s": min(encode_s) + min(decode_s)}
    decode_s = []
    for _ in range(repeats):  # the binary body again, decoded to numpy arrays
        start = time.perf_counter()
        _decode(body, as_arrays=True)
        decode_s.append(time.perf_counter() - start)
    result["arrays"] = dict(result["binary"], client_decode_s=min(decode_s),
                            total_s=result["binary"]["server_encode_s"] + min(decode_s))
    return result


async def load_generator(url: str, workload: Workload, concurrency: int, logprobs: int | None = 0) -> dict:
    """C clients, each sending one prompt (with the workload's n) at a time until all prompts are done."""
    queue: asyncio.Queue = asyncio.Queue()
    for prompt, m in zip(workload.prompts(), workload.max_tokens_per_prompt()):
        queue.put_nowait((prompt, m))
    latencies, failures, tokens = [], 0, 0

    async def client_loop(client: httpx.AsyncClient):
        nonlocal failures, tokens
        while True:
            try:
                prompt, m = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            start = time.perf_counter()
            try:
                r = await client.post(url + "/generate/", json={
                    "prompts": [prompt], "n": workload.n, "max_tokens": m, "logprobs": logprobs,
                    "generation_kwargs": {"ignore_eos": True}})
                r.raise_for_status()
                tokens += sum(len(ids) for ids in r.json()["completion_ids"])
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError:
                failures += 1

    async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=concurrency)) as client:
        # The timed runs before it sent the same prompts: start, like them, on a cold prefix cache.
        (await client.post(url + "/reset_prefix_cache/")).raise_for_status()
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else None

    return {"concurrency": concurrency, "seconds": seconds, "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds, "requests": len(latencies), "failed": failures,
            "latency_p50_s": pct(50), "latency_p90_s": pct(90), "latency_p99_s": pct(99)}


def run_server_bench(workload_name: str | Workload, device: str | None = None, output: str | None = None,
                     concurrency: int | None = None, data_parallel_size: int = 1, tensor_parallel_size: int = 1,
                     model_root: str | None = None, repeats: int = 3, server_args: list[str] | None = None) -> dict:
    """Offline, server JSON and server binary, each best of ``repeats``, every run and the median kept too (runs
    alternate JSON and binary so that a slow spell of a shared machine does not land on one of them only). ``server_args``: more `rlserve serve`
    flags (e.g. ``--ray_address auto``), recorded in the result."""
    from rlserve import LLM
    from rlserve.cli import serve_engine_config
    workload = workload_name if isinstance(workload_name, Workload) else get_workload(workload_name)
    dev = torch.device(device or ("cuda" if workload.device == "cuda" and torch.cuda.is_available() else "cpu"))
    root = Path(model_root or Path.home() / ".cache" / "rlserve" / "bench")
    model_dir, random_weights = prepare_model(workload, root, dev)
    result = {"workload": workload.name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "sequences": workload.num_sequences,
              "data_parallel_size": data_parallel_size,
              "tensor_parallel_size": tensor_parallel_size, "server_args": list(server_args or []),
              "repeats": repeats, "cold_prefix_cache": True,
              "timed": "request sent to every answer decoded to TRL's dict (orjson, or binary.decode) or, for "
                       "server_arrays, to numpy arrays (binary.decode_arrays)"}
    server = start_bench_server(model_dir, dev, random_weights, data_parallel_size, tensor_parallel_size,
                                server_args)
    try:
        for layout in ("json", "binary"):  # warm-up, on other prompts than the timed ones
            warm = [dict(p, max_tokens=min(p["max_tokens"], WARM_UP_TOKENS))
                    for p in _payloads(workload, 0, layout, seed=WARM_UP_SEED)]
            asyncio.run(_post_all(server.url, warm))
        runs: dict[str, list] = {layout: [] for layout in LAYOUTS}
        for _ in range(repeats):
            for layout, (wire, as_arrays) in LAYOUTS.items():
                parts: dict = {}
                seconds, tokens = asyncio.run(_post_all(server.url, _payloads(workload, 0, wire), parts=parts,
                                                        as_arrays=as_arrays))
                runs[layout].append((seconds, tokens, parts))
        for layout, key in RESULT_KEYS.items():
            seconds, tokens, parts = min(runs[layout], key=lambda run: run[0])
            assert tokens == workload.num_generated_tokens(), (tokens, workload.num_generated_tokens())
            all_seconds = sorted(run[0] for run in runs[layout])
            result[key] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
                           "response_format": LAYOUTS[layout][0], "client_arrays": LAYOUTS[layout][1],
                           "parts": parts, "all_seconds": all_seconds,
                           "median_seconds": statistics.median(all_seconds),
                           "runs": [{"seconds": run[0], "parts": run[2]} for run in runs[layout]]}  # in run order
        if concurrency:
            result["load"] = asyncio.run(load_generator(server.url, workload, concurrency))
    finally:
        server.stop(60)
    if data_parallel_size == 1 and tensor_parallel_size == 1:
        # The server's engine, offline: its flags as `serve` parses them (every spelling of async scheduling, batch
        # limits, seed ...). It runs after the server has exited: an offline async engine's GPU memory was not
        # back for the server's replica when it ran first (2 x H200, a79ec9d).
        config = serve_engine_config(["--model", str(model_dir),
                                      *bench_server_args(dev, random_weights, 1, 1, server_args)])
        llm = LLM(**{f.name: getattr(config, f.name) for f in fields(config)})
        result["offline_engine"] = {"async_scheduling": config.resolved_async_scheduling(),
                                    "num_scheduler_steps": config.num_scheduler_steps,
                                    "max_num_seqs": config.max_num_seqs, "seed": config.seed}
        # Best of N: run-to-run noise on small shared machines is larger than what is measured here.
        result["offline"] = min((run_rlserve(llm, workload, MODES["logprobs0"]) for _ in range(repeats)),
                                key=lambda r: r["seconds"])
        del llm
        for key in RESULT_KEYS.values():
            result[key]["http_overhead"] = 1 - result[key]["tokens_per_s"] / result["offline"]["tokens_per_s"]
    result["codec"] = codec_bench()
    _print(result)
    path = Path(output or f"bench_results/{workload.name}-server.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{result['workload']} through HTTP on {result['device']} (commit {result['commit']})")
    for column in ("path", "seconds", "tokens/s", "note"):
        table.add_column(column)
    if "offline" in result:
        table.add_row("offline engine", f"{result['offline']['seconds']:.2f}",
                      f"{result['offline']['tokens_per_s']:,.0f}", "logprobs=0")
    for key, label in (("server", "server /generate/, JSON"), ("server_binary", "server /generate/, binary"),
                       ("server_arrays", "server /generate/, binary as arrays")):
        s = result[key]
        note = f"HTTP overhead {s['http_overhead']:.1%}" if "http_overhead" in s else ""
        if len(s.get("all_seconds", [])) > 1:  # best of N hides the spread: show it
            note = (f"{note}; " if note else "") + (f"runs {min(s['all_seconds']):.2f}-{max(s['all_seconds']):.2f} s, "
                                                    f"median {s['median_seconds']:.2f}")
        if (s.get("parts") or {}).get("server_generate_s") is not None:
            p = s["parts"]
            note = (f"{note}; " if note else "") + (
                f"server generate {p['server_generate_s']:.2f} + build {p['server_build_s'] * 1e3:.0f} ms, client "
                f"decode {p['client_decode_s'] * 1e3:.0f} ms, rest {p['http_and_rest_s'] * 1e3:.0f} ms")
        for rep in (s.get("parts") or {}).get("replicas", []):
            note += f"; r{rep['replica']} {rep['steps']} steps {rep['step_s']:.2f} s gc {rep['gc_s'] * 1e3:.0f} ms"
        table.add_row(label, f"{s['seconds']:.2f}", f"{s['tokens_per_s']:,.0f}", note)
    codec = result.get("codec")
    if codec:
        for layout in ("json", "binary", "arrays"):
            if layout not in codec:
                continue
            c = codec[layout]
            table.add_row(f"codec only, {layout}", f"{c['total_s']:.3f}", "",
                          f"{codec['sequences']}x{codec['tokens_per_sequence']} tokens, logprobs=0: "
                          f"{c['bytes'] / 1e6:.1f} MB, encode {c['server_encode_s'] * 1e3:.0f} ms + "
                          f"decode {c['client_decode_s'] * 1e3:.0f} ms")
    if "load" in result:
        load = result["load"]
        table.add_row(f"load, {load['concurrency']} clients", f"{load['seconds']:.2f}",
                      f"{load['tokens_per_s']:,.0f}",
                      f"p50 {load['latency_p50_s']:.2f}s p90 {load['latency_p90_s']:.2f}s "
                      f"p99 {load['latency_p99_s']:.2f}s, {load['failed']} failed")
    Console().print(table)
