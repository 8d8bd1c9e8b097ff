"""Per-step cost of one grammar-guided request in a batch of 64 (the cpu-tiny workload):
``python -m rlserve.bench.structured_overhead``.

Runs the 64 sequences of cpu-tiny (16 prompts x 4 samples, 64 new tokens) with no grammar, then with one of
the 16 prompts guided by a regex that keeps it going for all 64 tokens, and reports the mean step time of
each and the difference. Unguided requests pay nothing (no mask is built); the guided one pays for its mask
and its state updates.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlserve.bench.bench import device_name, git_commit, prepare_model
from rlserve.bench.workloads import get_workload


def measure(repeats: int = 3, output: str | None = None) -> dict:
    import torch

    from rlserve import LLM, SamplingParams
    workload = get_workload("cpu-tiny")
    model_dir, _ = prepare_model(workload, Path.home() / ".cache" / "rlserve" / "bench", torch.device("cpu"))
    llm = LLM(str(model_dir), device="cpu")
    prompts = workload.prompts()
    plain = SamplingParams(n=workload.n, max_tokens=workload.max_tokens, ignore_eos=True, seed=0)
    guided = plain.clone(structured_outputs={"regex": f"[a-z]{{{workload.max_tokens}}}"}, ignore_eos=False)
    llm.generate(prompts[:2], plain.clone(max_tokens=4))
    llm.generate(prompts[:1], guided.clone(max_tokens=4, structured_outputs={"regex": "[a-z]{4}"}))  # warm-up

    def mean_step(params_list) -> float:
        best = float("inf")
        for _ in range(repeats):
            steps_before = llm.engine.num_steps
            start = time.perf_counter()
            llm.generate(prompts, params_list, detokenize=False)
            best = min(best, (time.perf_counter() - start) / (llm.engine.num_steps - steps_before))
        return best

    unguided = mean_step([plain] * len(prompts))
    one_guided = mean_step([guided] + [plain] * (len(prompts) - 1))
    result = {"workload": "cpu-tiny", "device": device_name(torch.device("cpu")), "commit": git_commit(),
              "date": time.strftime("%Y-%m-%d"), "sequences": workload.num_sequences,
              "guided_sequences": workload.n, "step_ms_unguided": unguided * 1e3,
              "step_ms_one_guided": one_guided * 1e3, "overhead_ms": (one_guided - unguided) * 1e3,
              "overhead_fraction": one_guided / unguided - 1}
    print(f"cpu-tiny, batch of {workload.num_sequences}: {unguided * 1e3:.2f} ms/step unguided, "
          f"{one_guided * 1e3:.2f} ms/step with one guided request (n={workload.n}): "
          f"+{result['overhead_ms']:.2f} ms ({result['overhead_fraction']:+.1%})")
    path = Path(output or "bench_results/structured-overhead.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    measure()
