"""``rlserve sweep``: which tensor x data parallel setup is fastest on this machine, for this model?

For every (tp, dp) with tp * dp <= N that the model's head counts allow, it starts a real ``rlserve serve``
with that layout, sends the workload through HTTP, and records tokens/s. It prints a table, names the best
setup, and writes JSON and a bar chart (PNG) -- the counterpart of the charts in TRL's "find the best
distributed setup" guide, measured on the user's own hardware.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from dataclasses import replace
from pathlib import Path

import torch

from rlserve.bench.bench import device_name, git_commit, prepare_model
from rlserve.bench.charts import pyplot
from rlserve.bench.server_bench import _payloads, _post_all, start_bench_server
from rlserve.bench.workloads import WARM_UP_SEED, WARM_UP_TOKENS, WORKLOADS, get_workload


def allowed_layouts(hf_config, num_devices: int) -> list[tuple[int, int]]:
    """(tp, dp) pairs with tp * dp <= num_devices where tp divides the heads, KV heads and MLP width."""
    kv = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    layouts = []
    for tp in range(1, num_devices + 1):
        if hf_config.num_attention_heads % tp or kv % tp or hf_config.intermediate_size % tp:
            continue
        for dp in range(1, num_devices // tp + 1):
            layouts.append((tp, dp))
    return layouts


def run_sweep(workload_name: str, num_devices: int, model: str | None = None, device: str | None = None,
              output_dir: str = "bench_results", num_prompts: int | None = None, max_tokens: int | None = None,
              logprobs: int | None = 0, server_args: list[str] | None = None) -> dict:
    """``server_args``: more `rlserve serve` flags for every layout's server (e.g. ``--async_scheduling``)."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from rlserve.models.loader import load_config, resolve_model_dir
    pyplot()  # before the sweep: a missing chart library fails now, not after every layout has run
    workload = get_workload(workload_name)
    if num_prompts or max_tokens:
        workload = replace(workload, num_prompts=num_prompts or workload.num_prompts,
                           max_tokens=max_tokens or workload.max_tokens, min_max_tokens=None)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and num_devices > torch.cuda.device_count():
        raise ValueError(f"--gpus {num_devices}: only {torch.cuda.device_count()} CUDA devices are visible")
    if model is None:
        model_dir, random_weights = prepare_model(workload, Path.home() / ".cache" / "rlserve" / "bench", dev)
    else:
        model_dir, random_weights = resolve_model_dir(model), False
    hf_config = load_config(model_dir)
    layouts = allowed_layouts(hf_config, num_devices)
    if model is not None:  # random prompts must stay inside the given model's vocabulary
        workload = replace(workload, architecture=dict(workload.architecture, vocab_size=hf_config.vocab_size))
    console = Console()
    results = []
    with Progress(console=console) as progress:
        task = progress.add_task(f"sweeping {len(layouts)} layouts", total=len(layouts))
        for tp, dp in layouts:
            progress.update(task, description=f"tp={tp} dp={dp}")
            server = start_bench_server(model_dir, dev, random_weights, dp, tp, server_args)
            try:
                # Warm up on other prompts; _post_all resets the prefix cache before the timed run.
                warm = _payloads(workload, logprobs, seed=WARM_UP_SEED)  # the whole batch's shape, briefly
                asyncio.run(_post_all(server.url, [dict(p, max_tokens=min(p["max_tokens"], WARM_UP_TOKENS))
                                                   for p in warm]))
                seconds, tokens = asyncio.run(_post_all(server.url, _payloads(workload, logprobs)))
            finally:
                server.stop(60)
            results.append({"tensor_parallel_size": tp, "data_parallel_size": dp, "devices": tp * dp,
                            "seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds})
            progress.advance(task)
    best = max(results, key=lambda r: r["tokens_per_s"])
    report = {"workload": workload.name, "model": str(model or workload.name), "device": device_name(dev),
              "num_devices": num_devices, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "prompts": workload.num_prompts, "n": workload.n, "max_tokens": workload.max_tokens,
              "logprobs": logprobs, "server_args": list(server_args or []), "results": results,
              "best": {"tensor_parallel_size": best["tensor_parallel_size"],
                       "data_parallel_size": best["data_parallel_size"], "tokens_per_s": best["tokens_per_s"]}}
    table = Table(title=f"rlserve sweep: {workload.name} on {num_devices} x {device_name(dev)}")
    for column in ("tp", "dp", "devices", "seconds", "tokens/s", "vs best"):
        table.add_column(column, justify="right")
    for r in sorted(results, key=lambda r: -r["tokens_per_s"]):
        table.add_row(str(r["tensor_parallel_size"]), str(r["data_parallel_size"]), str(r["devices"]),
                      f"{r['seconds']:.2f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s'] / best['tokens_per_s']:.2f}")
    console.print(table)
    console.print(f"best: tensor_parallel_size={best['tensor_parallel_size']} "
                  f"data_parallel_size={best['data_parallel_size']} ({best['tokens_per_s']:,.0f} tokens/s)")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{workload.name}-{num_devices}{dev.type}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    plot(report, out / f"{stem}.png")
    console.print(f"wrote {out / (stem + '.json')} and {out / (stem + '.png')}")
    return report


def plot(report: dict, path: Path) -> None:
    plt = pyplot()
    results = report["results"]
    labels = [f"TP={r['tensor_parallel_size']}\nDP={r['data_parallel_size']}" for r in results]
    values = [r["tokens_per_s"] for r in results]
    best = max(values)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(results)), 4))
    bars = ax.bar(labels, values, color=["tab:green" if v == best else "tab:blue" for v in values])
    ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{report['workload']} ({report['prompts']}x{report['n']} samples, {report['max_tokens']} tokens) "
                 f"on {report['num_devices']} x {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="Measure every tensor x data parallel layout and name the fastest.")
    p.add_argument("--model", default=None, help="a model (default: the workload's, with random weights)")
    p.add_argument("--gpus", type=int, required=True, help="devices to spread over (tp * dp <= gpus)")
    p.add_argument("--workload", default="rl-small", choices=list(WORKLOADS))
    p.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    p.add_argument("--output_dir", "--output-dir", default="bench_results")
    p.add_argument("--num_prompts", "--num-prompts", type=int, default=None, help="override the workload's")
    p.add_argument("--max_tokens", "--max-tokens", type=int, default=None, help="override the workload's")
    p.add_argument("--server_args", "--server-args", default="",
                   help="more `rlserve serve` flags for every layout, one string (e.g. \"--async_scheduling "
                        "--num_scheduler_steps 8\", the fast setting for RL rollouts on small models)")
    p.set_defaults(handler=lambda args: 0 if run_sweep(
        args.workload, args.gpus, args.model, args.device, args.output_dir, args.num_prompts,
        args.max_tokens, server_args=shlex.split(args.server_args)) else 1)
