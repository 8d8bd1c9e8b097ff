"""The GPU sampler's chunk kernel alone, this tree's against an earlier one's (a file path), at the RL batch shapes:
``git show 9cff133:rlserve/engine/sampler_triton.py > before.py; python tools/device_bench/sampler_ab.py before.py
[--output F]`` (9cff133: the last tree with one Philox call per vocab index). Best of 5 timings of 20 draws each
(CUDA events), the two alternated; also checks that both draw every row's token from a softmax that is not flat
(the tokens' mean logit is well above the row mean)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch

from rlserve.engine import sampler_triton as new


def load(path: str):
    spec = importlib.util.spec_from_file_location("sampler_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_draws(module, logits, inv_t, greedy, seeds, iters: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        module._gumbel_sample(logits, inv_t, greedy, seeds)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # µs per draw


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("before")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    old = load(args.before)
    result = {}
    for rows, vocab in ((512, 151936), (256, 151936), (256, 152064)):
        torch.manual_seed(0)
        logits = (torch.randn(rows, vocab, device="cuda") * 2).to(torch.bfloat16)
        inv_t = torch.ones(rows, device="cuda")
        greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
        seeds = torch.arange(rows, dtype=torch.int64, device="cuda") * 1000003 + 7
        times = {"before": [], "now": []}
        for name, module in (("before", old), ("now", new)):
            tokens, _ = module._gumbel_sample(logits, inv_t, greedy, seeds)  # compile, and a sanity check
            picked = logits.float().gather(1, tokens[:, None]).mean().item()
            assert picked > logits.float().mean().item() + 1.0, (name, picked)
        for _ in range(5):
            for name, module in (("before", old), ("now", new)):
                times[name].append(time_draws(module, logits, inv_t, greedy, seeds))
        best = {k: min(v) for k, v in times.items()}
        result[f"{rows}x{vocab}"] = {"us_before": best["before"], "us_now": best["now"],
                                     "speedup": best["before"] / best["now"], "all": times}
        print(f"{rows} x {vocab}: before {best['before']:.1f} us, now {best['now']:.1f} us, "
              f"{best['before'] / best['now']:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), **result}, f, indent=2)


if __name__ == "__main__":
    main()
