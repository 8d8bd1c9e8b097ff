"""``rlserve bench --against vllm``: the same workload through vLLM's offline ``LLM``, in a subprocess on the same
card, in the same run.

The parent writes a job (model directory, prompts, one engine-neutral sampling dict per prompt and mode, the
warm-up prompts) to JSON and starts ``python -m rlserve.bench.vllm_baseline JOB OUT`` with
``VLLM_USE_FLASHINFER_SAMPLER=0``; the child loads vLLM with prefix caching on (random weights through
``load_format="dummy"`` where rlserve uses them too), and for each mode warms up on prompts of another seed,
resets the prefix cache and times one ``generate`` of the whole workload. The parent reads OUT and puts each
mode beside rlserve's with the ratio rlserve / vLLM. A subprocess, because vLLM and rlserve cannot share one
process's CUDA context and memory budget; it ends before rlserve's engine starts, so each has the card alone.

This module imports vLLM only in the child: the parent works (and is tested) without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlserve.bench.workloads import BenchError

ENV = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}  # the reference figures of WORKLOADS.md were taken so


def unavailable_reason(python: str = sys.executable) -> str | None:
    """None when ``import vllm`` works in ``python`` (this interpreter by default), else why not."""
    if python == sys.executable:
        if importlib.util.find_spec("vllm") is None:
            return (f"vLLM is not importable in {python} (pip install vllm, or on the GPU host "
                    f"../shared/tools/vllm-wheelhouse.sh); run without --against vllm")
        return None
    check = subprocess.run([python, "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    return None if check.returncode == 0 else f"`import vllm` fails in {python}: {check.stderr.strip()[-500:]}"


def vllm_sampling_kwargs(params: dict) -> dict:
    """vLLM ``SamplingParams`` keyword arguments for one of ``workloads.request_params``'s dicts. Detokenizing
    is off on both sides (rlserve's bench passes ``detokenize=False``); top_k stays vLLM's default (all tokens)."""
    known = {"n", "temperature", "top_p", "max_tokens", "ignore_eos", "logprobs", "seed"}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"no vLLM mapping for sampling field(s): {', '.join(sorted(unknown))}")
    return dict(params, detokenize=False)


def make_job(model_dir: Path, random_weights: bool, dtype: str, gpu_memory_utilization: float,
             prompts: list[list[int]], warm_up_prompts: list[list[int]], warm_up_tokens: int,
             params_by_mode: dict[str, list[dict]], num_generated_tokens: int, tensor_parallel_size: int = 1,
             enforce_eager: bool = False) -> dict:
    """What the child runs; the engine settings are rlserve's own for the same run (tensor parallelism, eager)."""
    return {"model": str(model_dir), "load_format": "dummy" if random_weights else "auto", "dtype": dtype,
            "gpu_memory_utilization": gpu_memory_utilization, "tensor_parallel_size": tensor_parallel_size,
            "enforce_eager": enforce_eager, "prompts": prompts,
            "warm_up_prompts": warm_up_prompts, "warm_up_tokens": warm_up_tokens, "params": params_by_mode,
            "num_generated_tokens": num_generated_tokens}


def run_in_subprocess(job: dict, timeout_s: float = 3600, python: str = sys.executable,
                      cuda_device: int | None = None) -> dict:
    """Run ``job`` in a child process; returns {mode: {"seconds", "generated_tokens", "tokens_per_s"}} plus
    "startup_seconds" and "version". Raises BenchError with the child's last output when it fails."""
    env = {**os.environ, **ENV}
    if cuda_device is not None:  # the same card as rlserve's --device cuda:K
        visible = env.get("CUDA_VISIBLE_DEVICES")
        env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[cuda_device] if visible else str(cuda_device)
    with tempfile.TemporaryDirectory(prefix="rlserve-vllm-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([python, "-m", "rlserve.bench.vllm_baseline", str(job_path), str(out_path)],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stdout + proc.stderr).strip()[-3000:]
            raise BenchError(f"the vLLM baseline failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


def merge(result: dict, vllm: dict, engine_key) -> None:
    """Put vLLM's runs into ``result`` (keys ``engine_key("vllm", mode)``) and each rlserve run's ratio against
    the vLLM run of the same mode (``vs_vllm``: rlserve tokens/s over vLLM's)."""
    result["vllm_info"] = {"version": vllm.get("version"), "startup_seconds": vllm.get("startup_seconds"),
                           "env": dict(ENV)}
    for mode, run in vllm.get("modes", {}).items():
        result[engine_key("vllm", mode)] = run
        ours = result.get(engine_key("rlserve", mode))
        if ours is not None:
            ours["vs_vllm"] = ours["tokens_per_s"] / run["tokens_per_s"]


# -- the child ------------------------------------------------------------------------------------------------
def _child(job_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    import vllm

    job = json.loads(Path(job_path).read_text())
    start = time.perf_counter()
    llm = LLM(model=job["model"], dtype=job["dtype"], enable_prefix_caching=True, load_format=job["load_format"],
              gpu_memory_utilization=job["gpu_memory_utilization"], seed=0,
              tensor_parallel_size=job["tensor_parallel_size"], enforce_eager=job["enforce_eager"])
    out = {"version": vllm.__version__, "startup_seconds": time.perf_counter() - start, "modes": {}}
    prompts = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    warm = [{"prompt_token_ids": ids} for ids in job["warm_up_prompts"]]
    for mode, params in job["params"].items():
        sampling = [SamplingParams(**vllm_sampling_kwargs(p)) for p in params]
        warm_tokens = job["warm_up_tokens"]  # the same warm-up as rlserve's (workloads.WARM_UP_TOKENS)
        llm.generate(prompts=warm, sampling_params=[
            SamplingParams(**vllm_sampling_kwargs(dict(p, max_tokens=min(p["max_tokens"], warm_tokens))))
            for p in params[:len(warm)]], use_tqdm=False)
        llm.reset_prefix_cache()
        begin = time.perf_counter()
        outputs = llm.generate(prompts=prompts, sampling_params=sampling, use_tqdm=False)
        seconds = time.perf_counter() - begin
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        if tokens != job["num_generated_tokens"]:
            raise RuntimeError(f"vLLM generated {tokens} tokens, the workload asks for {job['num_generated_tokens']}")
        out["modes"][mode] = {"seconds": seconds, "generated_tokens": tokens, "tokens_per_s": tokens / seconds}
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
