"""Where the time of one decode step goes: ``python -m rlserve.bench.profile_step --workload rl-small``.

Fills the engine with the workload's sequences, lets them reach steady decoding, then times a number of
steps phase by phase: scheduling, building the step's inputs (host), the model (a CUDA-graph replay), the LM
head, sampling, the host sync that returns the tokens, and applying them (host). The device phases are
timed with CUDA events; the sum is close to, but a little above, an unprofiled step, because every phase
boundary waits for the device.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch


def profile(workload_name: str, steps: int = 50, logprobs: int | None = 0, output: str | None = None) -> dict:
    from rlserve import LLM
    from rlserve.bench.bench import device_name, git_commit, prepare_model, sampling_params
    from rlserve.bench.workloads import get_workload
    from rlserve.engine.sampling_batch import prepare_sampling

    workload = get_workload(workload_name)
    dev = torch.device("cuda")
    model_dir, random_weights = prepare_model(workload, Path.home() / ".cache" / "rlserve" / "bench", dev)
    llm = LLM(str(model_dir), device="cuda", dtype="bfloat16", load_format="dummy" if random_weights else "auto")
    engine, runner = llm.engine, llm.engine.runner
    for i, (prompt, params) in enumerate(zip(workload.prompts(), sampling_params(workload, logprobs))):
        engine.add_request(f"p{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting or len(engine.scheduler.running) < workload.num_sequences:
        engine.step()
    for _ in range(5):
        engine.step()
    times = defaultdict(float)

    def cpu_phase(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[name] += time.perf_counter() - start
        return out

    def gpu_phase(name, fn, *args):
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        times[name] += begin.elapsed_time(end) / 1e3
        return out

    batch_sizes = []
    with torch.inference_mode():
        _profile_steps(engine, runner, steps, cpu_phase, gpu_phase, batch_sizes, prepare_sampling)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    unprofiled = (time.perf_counter() - start) / steps
    total = sum(times.values())
    report = {"workload": workload_name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "steps": steps, "mean_batch": sum(batch_sizes) / steps,
              "logprobs": logprobs, "ms_per_step": {k: v / steps * 1e3 for k, v in times.items()},
              "total_ms_per_step": total / steps * 1e3, "unprofiled_ms_per_step": unprofiled * 1e3}
    print(f"{workload_name}: one decode step of {report['mean_batch']:.0f} sequences on {report['device']}")
    for name, ms in report["ms_per_step"].items():
        print(f"  {name:<26} {ms:7.3f} ms  {ms / report['total_ms_per_step']:6.1%}")
    print(f"  {'total':<26} {report['total_ms_per_step']:7.3f} ms "
          f"(an unprofiled engine step: {report['unprofiled_ms_per_step']:.3f} ms)")
    path = Path(output or f"bench_results/profile-{workload_name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    engine.abort_all()
    return report


def _profile_steps(engine, runner, steps, cpu_phase, gpu_phase, batch_sizes, prepare_sampling) -> None:
    for _ in range(steps):
        sched = cpu_phase("schedule (host)", engine.scheduler.schedule)
        items = sched.scheduled
        batch_sizes.append(len(items))
        step = cpu_phase("build inputs (host)", runner.build_step, items, sched.block_copies)
        ids, pos, meta, _ = gpu_phase("upload inputs", runner._device_inputs, step)
        hidden = gpu_phase("model (CUDA graph)", runner.graphs.run, ids, pos, meta.slot_mapping, meta.seq_lens,
                           meta.block_tables)
        logits = gpu_phase("LM head", runner.model.compute_logits, hidden)
        batch = cpu_phase("sampling inputs (host)", prepare_sampling, items, logits.shape[-1],
                          runner.info.eos_token_ids, runner.device)
        out = gpu_phase("sampler (+logprobs)", runner._sample, logits, batch)
        result = cpu_phase("device->host sync", runner._to_host, out)
        result.first_row = list(range(len(items)))
        cpu_phase("apply tokens (host)", engine.scheduler.update_from_output, sched, result, 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="rl-small")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    profile(args.workload, args.steps, output=args.output)
