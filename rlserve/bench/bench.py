"""``rlserve bench``: throughput of a workload, beside transformers ``generate`` and the card's roofline, all
measured in the same run. Prints a table and writes JSON."""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from rlserve.bench.workloads import Workload, get_workload


def git_commit() -> str:
    """The commit being measured (RLSERVE_COMMIT names it where the tree travels without .git)."""
    if os.environ.get("RLSERVE_COMMIT"):
        return os.environ["RLSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
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


def sampling_params(workload: Workload, logprobs: int | None, seed: int = 0):
    from rlserve import SamplingParams
    return [SamplingParams(n=workload.n, temperature=1.0, top_p=1.0, max_tokens=m, ignore_eos=True,
                           logprobs=logprobs, seed=seed + i)
            for i, m in enumerate(workload.max_tokens_per_prompt())]


def run_rlserve(llm, workload: Workload, logprobs: int | None) -> dict:
    prompts = workload.prompts()
    params = sampling_params(workload, logprobs)
    llm.generate(prompts[:4], [p.clone(max_tokens=8) for p in params[:4]])  # warm-up
    _sync(llm.info.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, detokenize=False)
    _sync(llm.info.device)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert tokens == workload.num_generated_tokens(), (tokens, workload.num_generated_tokens())
    if logprobs is not None:
        assert all(len(c.sampled_logprobs) == len(c.token_ids) for o in outputs for c in o.outputs)
    return {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}


def run_bench(workload_name: str, device: str | None = None, baseline: bool = True,
              logprobs_modes: tuple = (None, 0), output: str | None = None, model_root: str | None = None,
              engine_kwargs: dict | None = None, console=None) -> dict:
    from rlserve import LLM
    workload = get_workload(workload_name)
    dev = torch.device(device or ("cuda" if workload.device == "cuda" and torch.cuda.is_available() else "cpu"))
    root = Path(model_root or Path.home() / ".cache" / "rlserve" / "bench")
    model_dir, random_weights = prepare_model(workload, root, dev)
    result = {"workload": workload.name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "sequences": workload.num_sequences,
              "generated_tokens": workload.num_generated_tokens(), "torch": torch.__version__}
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
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
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    t0 = time.perf_counter()
    llm = LLM(str(model_dir), device=str(dev), dtype="bfloat16" if dev.type == "cuda" else "float32",
              load_format="dummy" if random_weights else "auto", **(engine_kwargs or {}))
    result["startup_seconds"] = round(time.perf_counter() - t0, 2)
    result["engine"] = llm.info.summary()
    for mode in logprobs_modes:
        key = "rlserve" if mode is None else f"rlserve_logprobs{mode}"
        result[key] = run_rlserve(llm, workload, mode)
        if "transformers" in result:
            result[key]["vs_transformers"] = result[key]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
        if "roofline" in result:
            result[key]["roofline_fraction"] = result["roofline"]["floor_seconds"] / result[key]["seconds"]
    print_table(result, console)
    path = Path(output or f"bench_results/{workload.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{result['workload']} on {result['device']} (commit {result['commit']})")
    for column in ("engine", "seconds", "tokens/s", "vs transformers", "roofline fraction"):
        table.add_column(column, justify="right" if column != "engine" else "left")
    for key in ("transformers", "rlserve", "rlserve_logprobs0"):
        if key not in result:
            continue
        r = result[key]
        table.add_row(key.replace("_logprobs0", " (logprobs=0)"), f"{r['seconds']:.2f}",
                      f"{r['tokens_per_s']:,.0f}",
                      f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else "",
                      f"{r['roofline_fraction']:.1%}" if "roofline_fraction" in r else "")
    (console or Console()).print(table)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
