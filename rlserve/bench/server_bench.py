"""``rlserve bench --through_server``: the workload through a real HTTP server beside the offline engine,
and a load generator (``--concurrency C``) reporting throughput, latency percentiles and failures."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import torch

from rlserve.bench.bench import device_name, git_commit, prepare_model, run_rlserve
from rlserve.bench.workloads import Workload, get_workload
from rlserve.server.process import ServerProcess


def start_bench_server(model_dir: Path, device: torch.device, random_weights: bool, dp: int, tp: int,
                       extra: list[str] | None = None) -> ServerProcess:
    """A server for a benchmark: its device and parallel sizes, random weights for models not on disk."""
    args = ["--device", str(device), "--data_parallel_size", str(dp), "--tensor_parallel_size", str(tp)]
    if random_weights:
        args += ["--load_format", "dummy", "--dtype", "bfloat16"]
    return ServerProcess(str(model_dir), *args, *(extra or []), startup_timeout=900, poll_s=0.5)


def _payloads(workload: Workload, logprobs: int | None) -> list[dict]:
    """One /generate/ request per distinct max_tokens (one in all for fixed-length workloads)."""
    groups: dict[int, list] = {}
    for prompt, m in zip(workload.prompts(), workload.max_tokens_per_prompt()):
        groups.setdefault(m, []).append(prompt)
    return [{"prompts": prompts, "n": workload.n, "temperature": 1.0, "top_p": 1.0, "max_tokens": m,
             "logprobs": logprobs, "generation_kwargs": {"ignore_eos": True}} for m, prompts in groups.items()]


async def _post_all(url: str, payloads: list[dict]) -> tuple[float, int]:
    async with httpx.AsyncClient(timeout=3600) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post(url + "/generate/", json=p) for p in payloads))
        seconds = time.perf_counter() - start
    for r in responses:
        r.raise_for_status()
    tokens = sum(len(ids) for r in responses for ids in r.json()["completion_ids"])
    return seconds, tokens


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
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else None

    return {"concurrency": concurrency, "seconds": seconds, "generated_tokens": tokens,
            "tokens_per_s": tokens / seconds, "requests": len(latencies), "failed": failures,
            "latency_p50_s": pct(50), "latency_p90_s": pct(90), "latency_p99_s": pct(99)}


def run_server_bench(workload_name: str, device: str | None = None, output: str | None = None,
                     concurrency: int | None = None, data_parallel_size: int = 1, tensor_parallel_size: int = 1,
                     model_root: str | None = None) -> dict:
    from rlserve import LLM
    workload = get_workload(workload_name)
    dev = torch.device(device or ("cuda" if workload.device == "cuda" and torch.cuda.is_available() else "cpu"))
    root = Path(model_root or Path.home() / ".cache" / "rlserve" / "bench")
    model_dir, random_weights = prepare_model(workload, root, dev)
    result = {"workload": workload.name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "data_parallel_size": data_parallel_size,
              "tensor_parallel_size": tensor_parallel_size}
    if data_parallel_size == 1 and tensor_parallel_size == 1:
        llm = LLM(str(model_dir), device=str(dev), load_format="dummy" if random_weights else "auto",
                  dtype="bfloat16" if dev.type == "cuda" else "float32")
        # Best of three: run-to-run noise on small shared machines is larger than what is measured here.
        result["offline"] = min((run_rlserve(llm, workload, 0) for _ in range(3)), key=lambda r: r["seconds"])
        del llm
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    server = start_bench_server(model_dir, dev, random_weights, data_parallel_size, tensor_parallel_size)
    try:
        asyncio.run(_post_all(server.url, [dict(p, max_tokens=8) for p in _payloads(workload, 0)[:1]]))  # warm-up
        seconds, tokens = min(asyncio.run(_post_all(server.url, _payloads(workload, 0))) for _ in range(3))
        assert tokens == workload.num_generated_tokens(), (tokens, workload.num_generated_tokens())
        result["server"] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
        if "offline" in result:
            result["server"]["http_overhead"] = 1 - result["server"]["tokens_per_s"] / result["offline"]["tokens_per_s"]
        if concurrency:
            result["load"] = asyncio.run(load_generator(server.url, workload, concurrency))
    finally:
        server.stop(60)
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
    s = result["server"]
    note = f"HTTP overhead {s['http_overhead']:.1%}" if "http_overhead" in s else ""
    table.add_row("server /generate/", f"{s['seconds']:.2f}", f"{s['tokens_per_s']:,.0f}", note)
    if "load" in result:
        load = result["load"]
        table.add_row(f"load, {load['concurrency']} clients", f"{load['seconds']:.2f}",
                      f"{load['tokens_per_s']:,.0f}",
                      f"p50 {load['latency_p50_s']:.2f}s p90 {load['latency_p90_s']:.2f}s "
                      f"p99 {load['latency_p99_s']:.2f}s, {load['failed']} failed")
    Console().print(table)
