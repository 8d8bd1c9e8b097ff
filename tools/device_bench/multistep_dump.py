"""Where K=1 and K=8 part, replay by replay (a device probe for the thirteenth session's bit question, not a test).

python tools/device_bench/multistep_dump.py BLOCK_N:WARPS:STAGES [--eager] [--warm]: the greedy half of
test_gpu.py's test_multi_step_launches_give_the_same_tokens_and_never_wait_bf16 (24 prompts, 45 tokens, bf16, the
rl-small shape with 4 layers) with 16-bit decode attention launched with that config, once with
num_scheduler_steps 1 and once with 8 (both synchronous). Every decode forward (CUDA-graph replay, or eager model
call with --eager) is recorded: its rows' input ids, positions, context lengths, hidden states, and each row's KV
cache read back through its block table (every layer, the positions the step attends to). The first forward where
the two runs differ is printed with what differs: inputs, the KV the step reads, or only the output. --warm compares
instead a K=1 run with the same prompts run again in the same engine, on a warm prefix cache (the thirteenth
session's K=1 = K=8 failure). --device cpu checks this script itself (reference attention)."""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import torch

from rlserve import LLM, SamplingParams
from rlserve.attention import triton_paged as tp
from rlserve.bench.workloads import QWEN25_05B
from rlserve.engine.runner import ModelRunner
from rlserve.models.tiny import make_tiny_model


def prompts(n, seed, vocab, low, high):
    rng = random.Random(seed)
    return [[rng.randrange(0, vocab) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def logical_kv(runner, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> list[torch.Tensor]:
    """Each row's keys and values [layers, 2, seq_len, KVH, D] read through its block table."""
    caches = [(m.k_cache, m.v_cache) for m in runner.model.modules() if getattr(m, "k_cache", None) is not None]
    bs = caches[0][0].shape[1]
    rows = []
    for r in range(seq_lens.shape[0]):
        n = int(seq_lens[r])
        pos = torch.arange(n, device=block_tables.device)
        blk = block_tables[r, pos // bs].long()
        rows.append(torch.stack([torch.stack([k[blk, pos % bs], v[blk, pos % bs]]) for k, v in caches]))
    return rows


def record(llm, batch, params, eager: bool) -> tuple[list[dict], list[list[int]]]:
    runner = llm.engine.runner
    forwards = []
    original = ModelRunner._run_model

    def run_model(self, ids, pos, meta):
        hidden = original(self, ids, pos, meta)
        if meta.num_prefills == 0:
            if hidden.is_cuda:
                torch.cuda.synchronize()
            forwards.append(dict(ids=ids.clone(), pos=pos.clone(), seq_lens=meta.seq_lens.clone(),
                                 hidden=hidden.clone(), kv=logical_kv(self, meta.block_tables, meta.seq_lens)))
        return hidden

    ModelRunner._run_model = run_model
    try:
        out = llm.generate(batch, params)
    finally:
        ModelRunner._run_model = original
    assert (runner.graphs is None) == eager
    return forwards, [o.outputs[0].token_ids for o in out]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="BLOCK_N:WARPS:STAGES for 16-bit decode attention")
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs) in both runs")
    parser.add_argument("--warm", action="store_true",
                        help="compare instead a K=1 run with a second one in the same engine (prefix cache warm)")
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script (reference attention)")
    args = parser.parse_args()
    block_n, warps, stages = args.config.split(":")
    config = dict(BLOCK_N=int(block_n), num_warps=int(warps), num_stages=int(stages))
    default_config = tp._decode_config
    tp._decode_config = lambda block_d, block_g, dtype, *rest: config if dtype != torch.float32 else default_config(
        block_d, block_g, dtype, *rest)

    arch = dict(QWEN25_05B, num_hidden_layers=4, initializer_range=0.05, max_position_embeddings=4096)
    model = make_tiny_model(Path(tempfile.mkdtemp()) / "rl-small-4l", "qwen2", seed=3, **arch)
    batch = prompts(24, seed=4, vocab=32000, low=5, high=100)
    params = SamplingParams(temperature=0, max_tokens=45, ignore_eos=True, logprobs=0)
    runs = []
    for steps in (1, 8) if not args.warm else (1,):
        llm = LLM(str(model), device=args.device, dtype="bfloat16", gpu_memory_utilization=0.3,
                  num_scheduler_steps=steps, async_scheduling=False, enforce_eager=args.eager)
        runs.append(record(llm, batch, params, args.eager or args.device == "cpu"))
        if args.warm:  # the same prompts again: each recomputes only its last block's tokens
            runs.append(record(llm, batch, params, args.eager or args.device == "cpu"))
        llm.shutdown()
    (f1, t1), (f8, t8) = runs
    what = "K=1 cold against K=1 on a warm prefix cache" if args.warm else "K=1 against K=8"
    print(f"{args.config}{' eager' if args.eager else ''}, {what}: tokens equal {t1 == t8}; "
          f"forwards {len(f1)} / {len(f8)}")
    for i, (a, b) in enumerate(zip(f1, f8)):
        same = {key: torch.equal(a[key], b[key]) for key in ("ids", "pos", "seq_lens", "hidden")}
        kv_rows = [r for r, (x, y) in enumerate(zip(a["kv"], b["kv"])) if not torch.equal(x, y)]
        if all(same.values()) and not kv_rows:
            continue
        rows = (a["hidden"] != b["hidden"]).any(-1).nonzero().flatten().tolist()
        print(f"first difference at decode forward {i}: equal {same}; rows whose KV differs {kv_rows[:8]}; rows "
              f"whose hidden state differs {rows[:8]} (seq_lens {a['seq_lens'][rows[:8]].tolist()})")
        for r in kv_rows[:3]:
            diff = (a["kv"][r] != b["kv"][r]).nonzero()
            print(f"  row {r}: KV differs at [layer, k/v, position, head, dim] {diff[:4].tolist()} "
                  f"({diff.shape[0]} elements)")
        break
    else:
        print("no forward differs")


if __name__ == "__main__":
    main()
