"""Which decode launch config keeps tests/test_gpu.py's K=1 vs K=8 bit equality? (a device probe, not a test)

python tools/device_bench/multistep_bits.py BLOCK_N:WARPS:STAGES[:prefetch] ...: for each config, 16-bit decode
attention is launched with it and test_multi_step_launches_give_the_same_tokens_and_never_wait_bf16 runs in this
process; one line per config. (The thirteenth session found that 32:2:4 with the block-id prefetch, the sweep's
fastest, fails that test while 64:4:3 passes, and that the prefetch itself changes no bits.)"""

from __future__ import annotations

import sys

import pytest
import torch

from rlserve.attention import triton_paged as tp


def main(specs: list[str]) -> None:
    default_config = tp._decode_config
    for spec in specs:
        block_n, warps, stages, *rest = spec.split(":")
        config = dict(BLOCK_N=int(block_n), num_warps=int(warps), num_stages=int(stages),
                      PREFETCH_BLOCKS=rest == ["prefetch"])
        tp._decode_config = lambda block_d, dtype, c=config: c if dtype != torch.float32 else default_config(
            block_d, dtype)
        code = pytest.main(["-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k",
                            "multi_step_launches_give_the_same_tokens"])
        print(f"### {spec}: {'passed' if code == 0 else f'exit {code}'}", flush=True)
    tp._decode_config = default_config


if __name__ == "__main__":
    main(sys.argv[1:])
