"""Micro benchmark: the per-step cost of penalties -- preparing their state (``prepare_sampling``) and applying
them to the logits (``sampler._apply_penalties``) -- for a decode batch of penalised sequences with long
outputs, each step appending one token per sequence as the engine does.

    python -m rlserve.bench.penalty_setup --rows 64 --vocab 32768 --prompt_len 512 --output_len 2048

It also runs against an older rlserve (before the penalty state persisted: ``prepare_sampling`` without the
``penalties`` argument rebuilds the state every step), so that before and after come from one script: put that
tree first on PYTHONPATH and run this file by its path. Prints a table, writes JSON with ``--output``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import time

import torch

from rlserve.engine.sampler import _apply_penalties
from rlserve.engine.sampling_batch import prepare_sampling
from rlserve.engine.scheduler import ScheduledSeq
from rlserve.engine.sequence import Request, Sequence
from rlserve.sampling import SamplingParams


def make_items(rows: int, vocab: int, prompt_len: int, output_len: int, rng: random.Random,
               repetition_only: bool = False) -> list[ScheduledSeq]:
    others = {} if repetition_only else dict(presence_penalty=0.2, frequency_penalty=0.1)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.1, **others)
    items = []
    for i in range(rows):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        request = Request(str(i), prompt, params, seed=i)
        request.is_forked = True
        seq = Sequence(request, 0, prompt + [rng.randrange(vocab) for _ in range(output_len)])
        seq.num_computed_tokens = len(seq.token_ids) - 1
        request.seqs = [seq]
        items.append(ScheduledSeq(seq, 1))
    return items


def run(rows: int, vocab: int, prompt_len: int, output_len: int, steps: int, device: str,
        repetition_only: bool = False) -> dict:
    rng = random.Random(0)
    dev = torch.device(device)
    items = make_items(rows, vocab, prompt_len, output_len, rng, repetition_only)
    incremental = "penalties" in inspect.signature(prepare_sampling).parameters
    state = None
    if incremental:
        from rlserve.engine.penalty_state import PenaltyState
        state = PenaltyState(rows, prompt_len + output_len + steps + 1, dev)
    logits = torch.randn(rows, vocab, device=dev)
    prepare_ms, apply_ms = [], []
    for _ in range(steps):
        work = logits.clone()
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        batch = (prepare_sampling(items, vocab, (0,), dev, state) if incremental
                 else prepare_sampling(items, vocab, (0,), dev))
        sync()
        t1 = time.perf_counter()
        _apply_penalties(work, batch)
        sync()
        t2 = time.perf_counter()
        prepare_ms.append((t1 - t0) * 1e3)
        apply_ms.append((t2 - t1) * 1e3)
        for item in items:  # the token the step drew
            item.seq.token_ids.append(rng.randrange(vocab))
            item.seq.num_computed_tokens += 1
    steady = slice(1, None)  # the first step fills the persistent rows (or is the same as any other)
    return {"implementation": "incremental" if incremental else "rebuilt every step", "rows": rows,
            "vocab": vocab, "prompt_len": prompt_len, "output_len": output_len, "steps": steps, "device": device,
            "penalties": "repetition" if repetition_only else "repetition, presence, frequency",
            "first_step_prepare_ms": prepare_ms[0], "prepare_ms_median": statistics.median(prepare_ms[steady]),
            "apply_ms_median": statistics.median(apply_ms[steady]),
            "state_bytes": 0 if state is None else state.counts.numel() * state.counts.element_size()
            + state.seen.numel()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--output_len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repetition_only", action="store_true", help="repetition_penalty alone (TRL's knob)")
    parser.add_argument("--output", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    with torch.inference_mode():
        result = run(args.rows, args.vocab, args.prompt_len, args.output_len, args.steps, args.device,
                     args.repetition_only)
    print(f"| implementation | penalties | rows x vocab | prompt + output | first step prepare | prepare (median) "
          f"| apply (median) |\n| --- | --- | --- | --- | ---: | ---: | ---: |\n"
          f"| {result['implementation']} | {result['penalties']} | {args.rows} x {args.vocab} | {args.prompt_len} + {args.output_len} "
          f"| {result['first_step_prepare_ms']:.2f} ms | {result['prepare_ms_median']:.2f} ms "
          f"| {result['apply_ms_median']:.2f} ms |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
