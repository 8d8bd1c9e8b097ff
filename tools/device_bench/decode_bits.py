"""Is the decode kernel's block-id prefetch bit-identical to the loop without it, and to itself run after run?

python tools/device_bench/decode_bits.py: at the rl-7b and rl-small decode shapes (forked prompts, block size 16,
bf16) and at a small batch with splits, the same launch config (BLOCK_N, warps, stages) with and without
PREFETCH_BLOCKS must give the same bits (same tiles in the same order; only when the ids are loaded differs), and
each config must give the same bits on every one of 50 runs. Prints one line per case; exit status 1 on any
difference. (A GPU check written after tests/test_gpu.py's K=1 vs K=8 bit comparison failed with the prefetch on.)"""

from __future__ import annotations

import sys

import torch

import decode_sweep  # this folder is on sys.path when the script runs
from rlserve.attention import triton_paged as tp

CASES = {  # name: decode_sweep shape (24 sequences x 2 KV heads: choose_num_splits gives 6 splits on an H200)
    "rl-7b-ctx786": decode_sweep.SHAPES["rl-7b-ctx786"],
    "rl-small-ctx384": decode_sweep.SHAPES["rl-small-ctx384"],
    "small-batch-splits": (24, 3, 2, 7, 32, 70, 64),
}
CONFIGS = [dict(BLOCK_N=32, num_warps=2, num_stages=4), dict(BLOCK_N=64, num_warps=4, num_stages=3),
           dict(BLOCK_N=32, num_warps=4, num_stages=3)]


def main() -> int:
    bad = 0
    default_config = tp._decode_config
    for name, shape in CASES.items():
        q, k, v, bt, lens = decode_sweep.build(*shape)
        scale = shape[6] ** -0.5
        for config in CONFIGS:
            outs = {}
            for prefetch in (False, True):
                tp._decode_config = lambda block_d, dtype, c=dict(config, PREFETCH_BLOCKS=prefetch): c
                try:
                    first = tp.decode_attention(q, k, v, bt, lens, scale).clone()
                    runs_differ = sum(not torch.equal(first, tp.decode_attention(q, k, v, bt, lens, scale))
                                      for _ in range(50))
                finally:
                    tp._decode_config = default_config
                outs[prefetch] = first
                bad += runs_differ > 0
                print(f"{name} {config} prefetch={prefetch}: {runs_differ} of 50 runs differ from the first")
            diff = (outs[True].float() - outs[False].float()).abs().max().item()
            bad += diff != 0
            print(f"{name} {config}: prefetch vs not, max abs difference {diff:.3g}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
