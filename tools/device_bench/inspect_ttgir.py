"""Compile the decode-attention kernel for sm_90 without a GPU and show how Triton pipelined it (a CPU check).

python tools/device_bench/inspect_ttgir.py [--configs 64:4:3,64:2:3] [--out DIR]: Triton's compiler
(frontend, TTGIR passes, ptxas) runs on any machine. For each BLOCK_N:num_warps:num_stages at the rl-7b shape (GQA
7, head dim 128, bf16, block size 16), prints the shared memory the kernel takes and its bf16 shared buffers as
depth x rows x cols: a K/V buffer of depth d means d - 1 tiles in flight while one is computed. Arguments that
Triton would specialise as multiples of 16 at launch (pointers, strides) are marked so, as they would be; without
that the loads cannot become asynchronous copies and nothing is pipelined. (A launch marks only what is: the
block-table stride, max_model_len / block_size, may not be a multiple of 16, and num_splits 1 is specialised as a
constant.) The TTGIR goes to DIR for reading.
This is how the twelfth session found the decode loop's depth of 1 (BENCHMARKS, twelfth and thirteenth sessions)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from rlserve.attention import triton_paged as tp

POINTERS = {"q_ptr": "*bf16", "k_cache": "*bf16", "v_cache": "*bf16", "bt_ptr": "*i32", "seq_lens_ptr": "*i32",
            "out_ptr": "*bf16", "part_m": "*fp32", "part_l": "*fp32", "part_acc": "*fp32", "prefix_ptr": "*i32",
            "members_ptr": "*i32", "pre_m": "*fp32", "pre_l": "*fp32", "pre_acc": "*fp32"}


def compile_decode(block_n: int, warps: int, stages: int):
    fn = tp._decode_kernel
    const = dict(NUM_HEADS=28, GROUP=7, BLOCK_SIZE=16, HEAD_DIM=128, BLOCK_G=16, BLOCK_N=block_n, BLOCK_D=128,
                 DIRECT=True, SHARED=False, PREFIX_SPLITS=1, DOT_PREC="tf32")
    sig = {n: POINTERS.get(n, "constexpr" if n in const else "fp32" if n == "qk_scale" else "i32")
           for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n in POINTERS or n.startswith("stride")}
    return triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="64:4:2,64:4:3,64:2:3,64:4:4", help="BLOCK_N:num_warps:num_stages,...")
    parser.add_argument("--out", default=None, help="write each TTGIR here")
    args = parser.parse_args()
    for spec in args.configs.split(","):
        block_n, warps, stages = (int(x) for x in spec.split(":"))
        kernel = compile_decode(block_n, warps, stages)
        ttgir = kernel.asm["ttgir"]
        buffers = re.findall(r"local_alloc : \(\) -> !ttg.memdesc<(\d+x\d+x\d+)xbf16", ttgir)
        print(f"BLOCK_N {block_n} warps {warps} stages {stages}: "
              f"shared {kernel.metadata.shared // 1024} KB, bf16 buffers {buffers}")
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, f"decode-{spec.replace(':', '-')}.ttgir").write_text(ttgir)


if __name__ == "__main__":
    main()
