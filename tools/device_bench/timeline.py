"""How busy the GPU is during decode, and what sits in its idle gaps (a device probe, not a test).

python tools/device_bench/timeline.py --workload rl-7b --warm_steps 60 --steps 4 --out DIR: the engine as
`rlserve bench` runs it (async scheduling, --num_scheduler_steps 8 unless told), filled with the workload and
stepped to a longer context, then ``--steps`` engine steps under torch.profiler. From the kernels, copies and
fills of the trace: the window from the first one's start to the last one's end, the time some of them run (the
union of their intervals), the idle rest, the number of decode steps in the window (launches of the sampler's draw
kernel), and the idle gaps summed by the pair of operations around them. The kernel sum per step of the seventh
session's profile left ~0.9 ms of a 10 ms rl-7b step unexplained: this says whether it is idle time, and where.
JSON in DIR/timeline-WORKLOAD.json."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from pathlib import Path

import torch


def short(name: str) -> str:
    """A kernel's name without template arguments and parameter lists, at most 60 characters."""
    name = re.sub(r"\(.*", "", name)
    while "<" in name:
        shorter = re.sub(r"<[^<>]*>", "", name)
        if shorter == name:
            break
        name = shorter
    return name.replace("void ", "")[:60]


def analyse(kernels: list[dict]) -> dict:
    """kernels: Chrome-trace events (ts, dur in µs, name), one stream's or all. Busy = union of intervals."""
    if not kernels:
        raise SystemExit("no GPU operation in the profiled window")
    kernels = sorted(kernels, key=lambda e: e["ts"])
    start, end = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    busy, reach, gaps = 0.0, start, defaultdict(lambda: [0, 0.0])
    prev = None
    for e in kernels:
        s, f = e["ts"], e["ts"] + e["dur"]
        if s > reach:
            if prev is not None:
                key = f"{short(prev['name'])} -> {short(e['name'])}"
                gaps[key][0] += 1
                gaps[key][1] += s - reach
        if f > reach:
            busy += f - max(s, reach)
            reach = f
            prev = e
    by_kernel = defaultdict(float)
    for e in kernels:
        by_kernel[short(e["name"])] += e["dur"]
    return dict(window_us=end - start, busy_us=busy, idle_us=end - start - busy,
                gaps=sorted(([k, n, us] for k, (n, us) in gaps.items()), key=lambda g: -g[2])[:25],
                kernels=sorted(([k, us] for k, us in by_kernel.items()), key=lambda g: -g[1])[:25])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="rl-7b")
    parser.add_argument("--mode", default="seeded")
    parser.add_argument("--warm_steps", type=int, default=60, help="engine steps before the profiled ones")
    parser.add_argument("--steps", type=int, default=4, help="engine steps under the profiler")
    parser.add_argument("--num_scheduler_steps", type=int, default=8)
    parser.add_argument("--out", default="/tmp")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile as torch_profile

    from rlserve import LLM
    from rlserve.bench.bench import git_commit, prepare_model
    from rlserve.bench.profile_step import fill_engine, timed_steps
    from rlserve.bench.workloads import MODES, get_workload

    workload = get_workload(args.workload)
    dev = torch.device("cuda")
    model_dir, random_weights = prepare_model(workload, Path.home() / ".cache" / "rlserve" / "bench", dev)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy" if random_weights else "auto",
              num_scheduler_steps=args.num_scheduler_steps)
    engine = llm.engine
    fill_engine(engine, workload, MODES[args.mode], args.warm_steps)
    plain_s, batches = timed_steps(engine, args.steps, dev)
    decode_tokens = sum(len(s.output_token_ids) for s in engine.scheduler.running)
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        timed_steps(engine, args.steps, dev)
    trace = Path("/tmp") / f"timeline-{args.workload}-trace.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    report = analyse(kernels)
    # decode steps in the window: the sampler's draw kernel runs once per step
    draws = sum(1 for e in kernels if "gumbel" in e["name"] and "merge" not in e["name"])
    report.update(workload=args.workload, steps=args.steps, num_scheduler_steps=args.num_scheduler_steps,
                  mean_batch=sum(batches) / len(batches), output_tokens_after=decode_tokens,
                  decode_steps_in_window=draws, unprofiled_engine_steps_s=plain_s,
                  commit=git_commit(),
                  date=time.strftime("%Y-%m-%d"))
    if not draws:
        print("no draw kernel in the window: the figures below are totals, not per decode step")
    per = max(draws, 1)
    print(f"{args.workload}: {draws} decode steps in the window, batch {report['mean_batch']:.0f}; "
          f"per step: window {report['window_us'] / per:.0f} us, busy {report['busy_us'] / per:.0f}, "
          f"idle {report['idle_us'] / per:.0f}; unprofiled {plain_s / max(args.steps, 1) * 1e3:.2f} ms an engine step")
    print("idle gaps, summed by the kernels around them (count, us per decode step):")
    for key, n, us in report["gaps"][:15]:
        print(f"  {us / per:8.1f}  {n:6d}  {key}")
    print("kernels (us per decode step):")
    for key, us in report["kernels"][:20]:
        print(f"  {us / per:8.1f}  {key}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"timeline-{args.workload}.json").write_text(json.dumps(report, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
