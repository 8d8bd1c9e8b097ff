"""Where the time of one decode step goes: ``python -m rlserve.bench.profile_step --workload rl-small``.

Fills the engine with the workload's sequences, lets them reach steady decoding, then runs the engine's own
``step()`` -- the real one, not a copy -- with timing hooks on the methods it calls: the scheduler's
``schedule`` and ``update_from_output``, and the runner's ``build_step``, ``_device_inputs``, the model (CUDA
graph replay or eager forward), ``compute_logits``, ``prepare_sampling``, ``_sample`` and ``_to_host``. The hooks
are instance attributes put on for the profiled steps and taken off after; what the step does besides the
hooked calls is reported as "rest of the step (host)". Device phases are timed with CUDA events after a
synchronize, so each phase boundary waits for the device: the profiled step is a little longer than an
unprofiled one (both are reported), and any overlap of host and device work shows up as host time.
``--torch_profiler DIR`` also records the same steps with ``torch.profiler`` (a Chrome trace and a table of
the top operators), without the synchronizing hooks.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch


class StepTimer:
    """Wraps methods of live objects so that each call adds its duration to ``times[name]``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = defaultdict(float)
        self._undo: list = []

    def hook(self, owner, attribute: str, name: str, on_device: bool) -> None:
        original = getattr(owner, attribute)
        timed = self._device_timed if on_device and self.device.type == "cuda" else self._host_timed

        def wrapper(*args, **kwargs):
            return timed(name, original, args, kwargs)

        had_own = attribute in vars(owner)  # a module's function, or an attribute set on the instance
        setattr(owner, attribute, wrapper)
        self._undo.append((owner, attribute, original if had_own else None))

    def remove(self) -> None:
        for owner, attribute, original in reversed(self._undo):
            if original is None:
                delattr(owner, attribute)  # the class's method shows through again
            else:
                setattr(owner, attribute, original)
        self._undo.clear()

    def _host_timed(self, name, fn, args, kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.times[name] += time.perf_counter() - start

    def _device_timed(self, name, fn, args, kwargs):
        torch.cuda.synchronize(self.device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = fn(*args, **kwargs)
        end.record()
        end.synchronize()
        self.times[name] += begin.elapsed_time(end) / 1e3
        return out


def install_hooks(timer: StepTimer, engine) -> None:
    """Time the phases of ``engine.step()`` (a single-process engine core)."""
    import rlserve.engine.runner as runner_module
    runner, scheduler = engine.runner, engine.scheduler
    timer.hook(scheduler, "schedule", "schedule (host)", on_device=False)
    timer.hook(runner, "build_step", "build inputs (host)", on_device=False)
    timer.hook(runner, "_device_inputs", "upload inputs", on_device=True)
    if runner.graphs is not None:
        timer.hook(runner.graphs, "run", "model (CUDA graph)", on_device=True)
    timer.hook(runner.model, "forward", "model (eager)", on_device=True)
    timer.hook(runner.model, "compute_logits", "LM head", on_device=True)
    timer.hook(runner_module, "prepare_sampling", "sampling inputs (host)", on_device=False)
    timer.hook(runner, "_sample", "sampler (+logprobs)", on_device=True)
    timer.hook(runner, "_to_host", "device->host sync", on_device=False)
    timer.hook(scheduler, "update_from_output", "apply tokens (host)", on_device=False)


def fill_engine(engine, workload, mode, warm_steps: int = 0) -> None:
    """Add every request of the workload and step until all are decoding, then ``5 + warm_steps`` steps more
    (``warm_steps`` moves the profiled steps to a longer context: half the generation length is the run's mean)."""
    from rlserve.bench.bench import sampling_params
    for i, (prompt, params) in enumerate(zip(workload.prompts(), sampling_params(workload, mode))):
        engine.add_request(f"p{i}", prompt, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting or len(engine.scheduler.running) < workload.num_sequences:
        engine.step()
    for _ in range(5 + warm_steps):
        engine.step()


def timed_steps(engine, steps: int, device: torch.device) -> tuple[float, list[int]]:
    """Seconds of ``steps`` engine steps (synchronized at both ends) and the batch size of each."""
    batch_sizes = []
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        batch_sizes.append(len(engine.scheduler.running))
        engine.step()
    _sync(device)
    return time.perf_counter() - start, batch_sizes


def profile(workload_name, steps: int = 50, mode_name: str = "seeded", output: str | None = None,
            device: str | None = None, torch_profiler: str | None = None, model_root: str | None = None,
            engine_kwargs: dict | None = None, warm_steps: int = 0, num_prompts: int | None = None) -> dict:
    """``num_prompts``: the workload's batch with that many prompts (e.g. a DP=2 replica's half)."""
    from rlserve import LLM
    from rlserve.bench.bench import device_name, git_commit, prepare_model
    from rlserve.bench.workloads import MODES, Workload, get_workload

    workload = workload_name if isinstance(workload_name, Workload) else get_workload(workload_name)
    if num_prompts is not None:
        workload = replace(workload, num_prompts=num_prompts)
    mode = MODES[mode_name]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if 3 * steps + 5 + warm_steps >= min(workload.max_tokens_per_prompt()):
        raise ValueError(f"--steps {steps} --warm_steps {warm_steps}: the shortest request "
                         f"({min(workload.max_tokens_per_prompt())} tokens) ends before the profiled steps do")
    model_dir, random_weights = prepare_model(workload, Path(model_root or Path.home() / ".cache" / "rlserve" /
                                                             "bench"), dev)
    # The synchronous engine unless asked otherwise: the phase hooks time the serial step (update_from_output),
    # which async scheduling splits into a launch and a later apply.
    engine_kwargs = {"async_scheduling": False, **(engine_kwargs or {})}
    llm = LLM(str(model_dir), device=str(dev), dtype="bfloat16" if dev.type == "cuda" else "float32",
              load_format="dummy" if random_weights else "auto", **engine_kwargs)
    engine = llm.engine
    fill_engine(engine, workload, mode, warm_steps)
    timer = StepTimer(dev)
    install_hooks(timer, engine)
    try:
        profiled_s, batch_sizes = timed_steps(engine, steps, dev)
    finally:
        timer.remove()
    unprofiled_s, _ = timed_steps(engine, steps, dev)
    phases = {k: v / steps * 1e3 for k, v in timer.times.items() if v > 0}
    phases["rest of the step (host)"] = max(0.0, profiled_s / steps * 1e3 - sum(phases.values()))
    report = {"workload": workload.name, "device": device_name(dev), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "steps": steps, "warm_steps": warm_steps,
              "mean_batch": sum(batch_sizes) / steps, "async_scheduling": engine.runner.async_scheduling,
              "mode": mode.name, "logprobs": mode.logprobs, "ms_per_step": phases,
              "total_ms_per_step": profiled_s / steps * 1e3, "unprofiled_ms_per_step": unprofiled_s / steps * 1e3,
              "timed": "the engine's own step() with hooks on the methods it calls"}
    if torch_profiler:
        report["torch_profiler"] = _torch_profile(engine, steps, dev, Path(torch_profiler),
                                                  workload.name + (f"-p{num_prompts}" if num_prompts else ""))
    print(f"{workload.name}: one decode step of {report['mean_batch']:.0f} sequences on {report['device']} "
          f"({mode.name})")
    for name, ms in phases.items():
        print(f"  {name:<26} {ms:7.3f} ms  {ms / report['total_ms_per_step']:6.1%}")
    print(f"  {'total':<26} {report['total_ms_per_step']:7.3f} ms "
          f"(an unprofiled engine step: {report['unprofiled_ms_per_step']:.3f} ms)")
    path = Path(output or f"bench_results/profile-{workload.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    engine.abort_all()
    return report


def _torch_profile(engine, steps: int, device: torch.device, out_dir: Path, name: str) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch_profile(activities=activities) as prof:
        timed_steps(engine, steps, device)
    trace = out_dir / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=90)
    (out_dir / f"ops-{name}.txt").write_text(table)
    print(table)
    return {"trace": str(trace), "ops_table": str(out_dir / f"ops-{name}.txt")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", default="rl-small")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--mode", default="seeded", choices=["plain", "logprobs0", "seeded"])
    parser.add_argument("--device", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--torch_profiler", "--torch-profiler", default=None, metavar="DIR")
    parser.add_argument("--warm_steps", "--warm-steps", type=int, default=0,
                        help="decode steps before the profiled ones (a longer context)")
    parser.add_argument("--num_prompts", "--num-prompts", type=int, default=None, help="override the workload's")
    args = parser.parse_args()
    profile(args.workload, args.steps, args.mode, args.output, args.device, args.torch_profiler,
            warm_steps=args.warm_steps, num_prompts=args.num_prompts)
