"""Decode attention by TMA (``_decode_tma_kernel``) against the gather kernel (H200 diagnosis, not a test).

python tools/device_bench/tma_decode_probe.py --out DIR [--shapes ...] [--configs warps:stages,...]: the seventeenth
session found ``_decode_kernel`` bound by its K/V loads as issued (3.15 TB/s of distinct bytes at rl-7b, 76% of a
copy's rate). The TMA kernel fetches each cache block of a KV head ([block_size, head_dim], one box of a 4-D tensor
descriptor on the cache) by the Tensor Memory Accelerator on one thread's command (two copies at head dim 128: the
swizzle's 128-byte rows), and Triton's pipeliner keeps ``num_stages - 1`` boxes in flight. One split, direct output:
the launch the one-warp config runs.

Times are do_bench_cudagraph medians (no host launch cost in them), each call walking ``--copies`` caches (4: no
call finds its K/V in the L2); ``gather`` is ``decode_attention`` with its TMA path off, ``rlserve`` as it ships
(TMA where ``_tma_decode_ok``), ``tma-W:S`` the TMA kernel at W warps and S stages. Outputs are compared with the
gather kernel's first. JSON in DIR/tma_decode_probe.json. (The eighteenth session's first run, c09b137's JSON, timed
one warm cache and a variant of the kernel that could also take two blocks a step: it lost, as did 2 and 4 warps
and 4 stages.)"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp

if __package__ in (None, ""):  # run as a script: decode_sweep.py sits beside this file
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import SHAPES, build, time_graphed  # noqa: E402


def decode_tma(q, k_cache, v_cache, block_tables, seq_lens, scale, out, num_warps=1, num_stages=3):
    """rlserve's ``_decode_tma_kernel`` at a launch config of this probe's choosing (rlserve: 1 warp, 3 stages)."""
    batch, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[2]
    tp._decode_tma_kernel[(batch, k_cache.shape[2])](
        q, tp._cache_descriptor(k_cache), tp._cache_descriptor(v_cache), block_tables, seq_lens, out,
        seq_lens, seq_lens, seq_lens, seq_lens,  # the shared-prefix arguments, not read (SHARED=False)
        scale * tp._LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), SHARED=False, PREFIX_SPLITS=1,
        num_warps=num_warps, num_stages=num_stages)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--shapes", default="rl-7b-ctx786,rl-7b-ctx1100,rl-small-ctx384,7b-p2048-ctx2300")
    parser.add_argument("--configs", default="1:2,1:3,1:4,2:3", help="num_warps:num_stages,...")
    parser.add_argument("--copies", type=int, default=4,
                        help="caches a timed call walks through in turn, so that no call finds the last one's K/V "
                             "in the L2 (the engine's GEMMs evict it between layers); times are per kernel")
    args = parser.parse_args()
    SHAPES.setdefault("7b-p2048-ctx2300", (256, 8, 4, 7, 2048, 251, 128))
    result = {"device": torch.cuda.get_device_name(), "commit": os.environ.get("RLSERVE_COMMIT", "unknown"),
              "args": vars(args), "shapes": []}
    tma_kernel = tp._decode_tma_kernel

    def gather(*a, **kw):  # decode_attention with its TMA path off: the gather kernel, as before c09b137
        cap = tp._TMA_MIN_CAPABILITY
        tp._TMA_MIN_CAPABILITY = 1 << 30
        tp._decode_tma_kernel = None  # (were the dispatch ever to ignore the switch, this would say so)
        try:
            return tp.decode_attention(*a, **kw)
        finally:
            tp._TMA_MIN_CAPABILITY = cap
            tp._decode_tma_kernel = tma_kernel

    for name in args.shapes.split(","):
        batch, n, kvh, group, prompt, gen, d = SHAPES[name]
        copies = [build(batch, n, kvh, group, prompt, gen, d) for _ in range(args.copies)]
        q, k, v, bt, lens = copies[0]
        # a ragged batch for the check: every tail length, block-table padding past each row's last block
        ragged = lens - torch.arange(batch, device="cuda", dtype=torch.int32) % 40
        scale = d ** -0.5
        # Useful bytes: each prompt's K/V once a group, each row's own keys once (not HBM traffic: the samples
        # re-read their prompt, through the L2 or not, and TMA fetches whole blocks)
        useful = ((batch // n) * prompt + batch * (gen + 1)) * kvh * d * 2 * 2
        out = torch.empty_like(q)
        row = {"shape": name, "useful_bytes": useful}
        for lens_ in (ragged, lens):
            want = gather(q, k, v, bt, lens_, scale).float()
            torch.testing.assert_close(tp.decode_attention(q, k, v, bt, lens_, scale).float(), want, atol=2e-2,
                                       rtol=1e-2)
            for spec in args.configs.split(","):
                warps, stages = (int(x) for x in spec.split(":"))
                got = decode_tma(q, k, v, bt, lens_, scale, out, warps, stages).float()
                torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)

        def each_copy(fn):
            return lambda: [fn(c) for c in copies]

        timings = [("gather", each_copy(lambda c: gather(*c, scale, out=out))),
                   ("rlserve", each_copy(lambda c: tp.decode_attention(*c, scale, out=out)))]
        for spec in args.configs.split(","):
            warps, stages = (int(x) for x in spec.split(":"))
            timings.append((f"tma-{spec}", each_copy(lambda c, w=warps, s=stages: decode_tma(*c, scale, out, w, s))))
        timings += [("gather-again", timings[0][1]), ("rlserve-again", timings[1][1])]
        for label, fn in timings:
            us = time_graphed(fn, name, label, calls=len(copies))
            if us is None:
                continue
            row[label] = us
            print(f"{name:18} {label:14} {us:8.1f} us  {useful / us / 1e6:5.2f} TB/s useful", flush=True)
        result["shapes"].append(row)
        Path(args.out, "tma_decode_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
