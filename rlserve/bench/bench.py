"""``rlserve bench``: throughput of a workload, beside transformers ``generate`` and the card's roofline, all
measured in the same run. Prints a table and writes JSON."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from rlserve.bench.workloads import (MODES, WARM_UP_SEED, WARM_UP_TOKENS, BenchError, Mode, Workload, get_workload,
                                     request_params)


def git_commit(cwd: Path | None = None) -> str:
    """The commit being measured (RLSERVE_COMMIT names it where the tree travels without .git). A tree whose
    tracked files differ from HEAD is ``<HEAD>-dirty``: a copied tree beside a stale .git must not pass for HEAD."""
    if os.environ.get("RLSERVE_COMMIT"):
        return os.environ["RLSERVE_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd or Path(__file__).parent,
                              timeout=5).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        return f"{head}-dirty" if git("status", "--porcelain", "--untracked-files=no") else head
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def prepare_model(workload: Workload, root: Path, device: torch.device) -> tuple[Path, bool]:
    """A model directory for the workload; on GPUs only config + tokenizer (both sides use random weights,
    which does not change throughput at fixed output lengths). Returns (path, random_weights)."""
    from rlserve.models.tiny import make_tiny_model
    random_weights = device.type == "cuda"
    path = root / f"{workload.name}{'-config' if random_weights else ''}"
    if not (path / "config.json").exists():
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        make_tiny_model(path, workload.family, dtype=dtype, with_weights=not random_weights,
                        **workload.architecture)
    return path, random_weights


def sampling_params(workload: Workload, mode: Mode, seed: int = 0):
    from rlserve import SamplingParams
    return [SamplingParams(**p) for p in request_params(workload, mode, seed)]


def engine_key(engine: str, mode: str) -> str:
    """The JSON key of one engine's run in one mode: "rlserve", "rlserve_logprobs0", "vllm_seeded"..."""
    return engine if mode == "plain" else f"{engine}_{mode}"


def run_rlserve(llm, workload: Workload, mode: Mode) -> dict:
    """One timed ``generate`` of the whole workload on a cold prefix cache: the warm-up runs other prompts
    (another seed) in the same mode, then the cache is reset, so that no figure depends on what ran before."""
    params = sampling_params(workload, mode)
    warm_up = workload.prompts(seed=WARM_UP_SEED)
    llm.generate(warm_up, [p.clone(max_tokens=min(p.max_tokens, WARM_UP_TOKENS)) for p in params], detokenize=False)
    llm.reset_prefix_cache()
    _sync(llm.info.device)
    hits_before = llm.stats().get("prefix_cache_hit_tokens", 0)
    start = time.perf_counter()
    outputs = llm.generate(workload.prompts(), params, detokenize=False)
    _sync(llm.info.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert tokens == workload.num_generated_tokens(), (tokens, workload.num_generated_tokens())
    if mode.logprobs is not None:
        assert all(len(c.sampled_logprobs) == len(c.token_ids) for o in outputs for c in o.outputs)
    # Hits inside the timed run are the n samples of a prompt sharing its blocks, never an earlier run's.
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds,
            "prefix_cache_hit_tokens": llm.stats().get("prefix_cache_hit_tokens", 0) - hits_before}


def run_bench(workload_name: str | Workload, device: str | None = None, baseline: bool = True,
              modes: tuple[str, ...] = tuple(MODES), output: str | None = None, model_root: str | None = None,
              engine_kwargs: dict | None = None, console=None, against: tuple[str, ...] = (),
              rounds: int = 1) -> dict:
    """``against``: other engines to run beside rlserve in the same run ("vllm"). ``rounds``: each engine runs
    this many times, in turns, each time in a fresh engine; the figures are the medians."""
    workload = workload_name if isinstance(workload_name, Workload) else get_workload(workload_name)
    dev = torch.device(device or ("cuda" if workload.device == "cuda" and torch.cuda.is_available() else "cpu"))
    unknown = set(modes) - set(MODES)
    if unknown:
        raise BenchError(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(MODES)}")
    if "vllm" in against:  # fail before anything is measured
        from rlserve.bench.vllm_baseline import unavailable_reason
        reason = unavailable_reason()
        if reason:
            raise BenchError(reason)
    root = Path(model_root or Path.home() / ".cache" / "rlserve" / "bench")
    model_dir, random_weights = prepare_model(workload, root, dev)
    result = {"workload": workload.name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "sequences": workload.num_sequences,
              "generated_tokens": workload.num_generated_tokens(), "torch": torch.__version__,
              "modes": list(modes), "cold_prefix_cache": True, "engine_kwargs": dict(engine_kwargs or {})}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    dtype_name = "bfloat16" if dev.type == "cuda" else "float32"
    if dev.type == "cuda":
        from rlserve.bench.roofline import measure_copy_bandwidth, measure_matmul_rate, roofline_seconds
        bandwidth, flops = measure_copy_bandwidth(dev), measure_matmul_rate(dev)
        result["roofline"] = roofline_seconds(workload.architecture, workload.prompt_len, workload.num_prompts,
                                              workload.n, workload.max_tokens_per_prompt(), 2, bandwidth, flops)
        result["roofline"].update(copy_bandwidth_gbs=bandwidth / 1e9, matmul_tflops=flops / 1e12)
    if baseline:
        from rlserve.bench.baselines import hf_generate_throughput, load_hf_model
        hf = load_hf_model(model_dir, dtype, dev, random_weights)
        result["transformers"] = hf_generate_throughput(hf, workload.prompts(), workload.n,
                                                        workload.max_tokens_per_prompt())
        del hf
        _free_memory(dev)
    job = None
    if "vllm" in against:
        from rlserve.bench import vllm_baseline
        engine = engine_kwargs or {}
        job = vllm_baseline.make_job(
            model_dir, random_weights, dtype_name, engine.get("gpu_memory_utilization", 0.9),
            workload.prompts(), workload.prompts(seed=WARM_UP_SEED), WARM_UP_TOKENS,
            {m: request_params(workload, MODES[m]) for m in modes}, workload.num_generated_tokens(),
            tensor_parallel_size=engine.get("tensor_parallel_size", 1),
            enforce_eager=engine.get("enforce_eager", False))
    # Each round runs each engine in a fresh process or engine, alone on the card; who goes first alternates
    # (vLLM in odd rounds), so that a card warming or cooling over the call does not favour one side.
    rounds_run = []
    for i in range(rounds):
        runs = {}
        for side in ("vllm", "rlserve") if i % 2 == 0 else ("rlserve", "vllm"):
            if side == "vllm" and job is not None:
                _free_memory(dev)
                runs["vllm"] = vllm_baseline.run_in_subprocess(
                    job, cuda_device=dev.index if dev.type == "cuda" else None)
            elif side == "rlserve":
                runs["rlserve"] = _rlserve_round(model_dir, random_weights, dtype_name, dev, workload, modes,
                                                 engine_kwargs, result if i == 0 else None)
        rounds_run.append(runs)
    for mode in modes:
        result[engine_key("rlserve", mode)] = median_run([r["rlserve"][mode] for r in rounds_run])
    if job is not None:
        first = rounds_run[0]["vllm"]
        medians = {mode: median_run([r["vllm"]["modes"][mode] for r in rounds_run]) for mode in first["modes"]}
        vllm_baseline.merge(result, {**first, "modes": medians}, engine_key)
        if rounds > 1:
            result["rounds"] = [{"first": "vllm" if i % 2 == 0 else "rlserve",
                                 "vs_vllm": {mode: r["rlserve"][mode]["tokens_per_s"]
                                             / r["vllm"]["modes"][mode]["tokens_per_s"] for mode in modes}}
                                for i, r in enumerate(rounds_run)]
    for key, run in result.items():
        if not (key.startswith("rlserve") or key.startswith("vllm")) or not isinstance(run, dict) \
                or "tokens_per_s" not in run:
            continue
        if "transformers" in result:  # useful tokens on both sides (see baselines.hf_generate_throughput)
            run["vs_transformers"] = run["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        if "roofline" in result:
            run["roofline_fraction"] = result["roofline"]["floor_seconds"] / run["seconds"]
    print_table(result, console)
    path = Path(output or f"bench_results/{workload.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _rlserve_round(model_dir: Path, random_weights: bool, dtype_name: str, dev: torch.device, workload: Workload,
                   modes, engine_kwargs: dict | None, record: dict | None) -> dict:
    """A fresh engine times every mode, then gives the card back -> {mode: run}. ``record``: where its start-up
    time and engine summary go (the first round's)."""
    from rlserve import LLM
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), device=str(dev), dtype=dtype_name,
              load_format="dummy" if random_weights else "auto", **(engine_kwargs or {}))
    if record is not None:
        record["startup_seconds"] = round(time.perf_counter() - t0, 2)
        record["engine"] = {**llm.info.summary(), "async_scheduling": llm.engine.runner.async_scheduling,
                            "num_scheduler_steps": llm.config.num_scheduler_steps}  # as run (unset flags resolved)
    try:
        return {mode: run_rlserve(llm, workload, MODES[mode]) for mode in modes}
    finally:
        llm.shutdown()
        _free_memory(dev)


def median_run(runs: list[dict]) -> dict:
    """One engine's runs of a mode, one per round -> the first run with the median seconds (the mean of the middle
    two for an even count) and its tokens/s, each round's tokens/s beside them when there are several."""
    if len(runs) == 1:
        return runs[0]
    seconds = statistics.median(r["seconds"] for r in runs)
    return {**runs[0], "seconds": seconds, "tokens_per_s": runs[0]["generated_tokens"] / seconds,
            "rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{result['workload']} on {result['device']} (commit {result['commit']}), "
                        f"each run on a cold prefix cache",
                  caption="tokens/s: useful generated tokens (each prompt's max_tokens x n) per wall second")
    rows = []
    if "transformers" in result:
        rows.append(("transformers", "plain", result["transformers"]))
    for engine in ("vllm", "rlserve"):
        for mode in result.get("modes", MODES):
            if engine_key(engine, mode) in result:
                rows.append((engine, mode, result[engine_key(engine, mode)]))
    # The ratio columns that some row has, each with its format.
    ratios = [(name, key, fmt) for name, key, fmt in (("vs transformers", "vs_transformers", "{:.2f}x"),
                                                      ("vs vLLM", "vs_vllm", "{:.2f}x"),
                                                      ("roofline fraction", "roofline_fraction", "{:.1%}"))
              if any(key in r for _, _, r in rows)]
    for column in ["engine", "mode", "seconds", "tokens/s"] + [name for name, _, _ in ratios]:
        table.add_column(column, justify="left" if column in ("engine", "mode") else "right")
    for engine, mode, r in rows:
        table.add_row(engine, mode, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      *[fmt.format(r[key]) if key in r else "" for _, key, fmt in ratios])
    (console or Console()).print(table)
    if "rounds" in result:
        by_mode = "; ".join(f"{mode} " + ", ".join(f"{r['vs_vllm'][mode]:.2f}x" for r in result["rounds"])
                            for mode in result.get("modes", MODES) if mode in result["rounds"][0]["vs_vllm"])
        (console or Console()).print(f"medians of {len(result['rounds'])} rounds, vLLM first in the odd ones; "
                                     f"rlserve / vLLM by round: {by_mode}")
    hf = result.get("transformers")
    if hf and hf.get("generated_tokens", 0) > hf.get("useful_tokens", hf.get("generated_tokens", 0)):
        (console or Console()).print(
            f"transformers pads every row to the longest max_tokens: it generated {hf['generated_tokens']:,} tokens "
            f"({hf['generated_tokens_per_s']:,.0f}/s), of which {hf['useful_tokens']:,} were asked for; the table "
            f"counts those.")


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
