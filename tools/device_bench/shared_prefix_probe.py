"""Decode attention with and without the shared-prefix pass, at decode_sweep.py's shapes (H200 diagnosis, not a test).

python tools/device_bench/shared_prefix_probe.py --out DIR [--shapes rl-7b-ctx786,...]: forked prompts sharing their
cache blocks (bf16, block size 16), every group of ``n`` samples planned as the runner plans it. Times, each the
median of triton's do_bench_cudagraph: no host launch work in them. (The seventeenth session's figures are
do_bench's, each run launched from Python after an L2 flush: the decode kernel read 93.2 us there against 83.2 under
do_bench_cudagraph in the eighteenth session, and a path of two launches and three allocations may pay more.)

- ``plain``: ``decode_attention`` reading every row's whole context (no plan);
- ``shared-sS``: with the plan -- the shared-prefix pass in S programs per group and KV head (``PREFIX_SPLITS``),
  then the decode kernel over each row's own keys, merging the S partials (the TMA kernel where it runs);
  ``shared-auto``: S as ``choose_prefix_splits`` picks it (the engine's launch); ``shared-auto-gather``: the same
  with the own keys read by the gather kernel (``_tma_decode_ok`` off: the nineteenth session's start);
- ``prefix-pass-sS``: the shared-prefix pass alone, S programs per group and KV head; ``prefix-pass-C`` one
  program at the configs ``PREFIX_CONFIGS`` (BLOCK_N:num_warps:num_stages);
- ``plain-hnd``: ``plain`` on the same cache stored head-major ([blocks, KVH, block_size, D]) (the seventeenth
  session: no different);
- ``own-keys``: ``plain`` over only each row's own keys (its context less the prompt): what the decode kernel's
  part of ``shared`` would take if the pass were free.

Outputs of ``shared-sS`` and ``plain`` are compared first. JSON in DIR/shared_prefix_probe.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp
from rlserve.attention.metadata import SharedPrefixes, plan_shared_prefixes

if __package__ in (None, ""):  # run as a script: decode_sweep.py sits beside this file
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import SHAPES, build, time_graphed  # noqa: E402

PREFIX_CONFIGS = ["64:4:3", "32:4:3", "64:8:3", "64:4:2"]
PREFIX_SPLITS = [1, 2, 4, 8]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--shapes", default="7b-p1024-ctx1300,7b-p2048-ctx2300,7b-p2048-b128,7b-p2048-b64,"
                                            "rl-7b-ctx786,7b-n16-p512-ctx800")
    args = parser.parse_args()
    SHAPES.setdefault("rl-7b-ctx300", (256, 8, 4, 7, 256, 44, 128))  # early in the decode: the prompt is most keys
    # Long prompts at the 7B shape: a group's prompt no longer fits the L2 a few times over
    SHAPES.setdefault("7b-p1024-ctx1300", (256, 8, 4, 7, 1024, 275, 128))
    SHAPES.setdefault("7b-p2048-ctx2300", (256, 8, 4, 7, 2048, 251, 128))
    SHAPES.setdefault("7b-n16-p512-ctx800", (256, 16, 4, 7, 512, 287, 128))
    # Fewer sequences (the tail of an RL batch): the pass's time does not shrink with them; plain decode's does
    SHAPES.setdefault("7b-p2048-b64", (64, 8, 4, 7, 2048, 251, 128))
    SHAPES.setdefault("7b-p2048-b128", (128, 8, 4, 7, 2048, 251, 128))
    result = {"device": torch.cuda.get_device_name(), "shapes": []}
    default_config = tp._shared_prefix_config
    decode_config = tp._decode_config
    for name in args.shapes.split(","):
        batch, n, kvh, group, prompt, gen, d = SHAPES[name]
        q, k, v, bt, lens = build(batch, n, kvh, group, prompt, gen, d)
        scale = d ** -0.5
        plan = plan_shared_prefixes(bt.tolist(), lens.tolist(), k.shape[1], tp.SHARED_PREFIX_ROWS // group, 4)
        assert plan is not None and plan[1][0] == min(n, tp.SHARED_PREFIX_ROWS // group), plan and plan[1][:n]
        shared_prefixes = SharedPrefixes(*(torch.tensor(p, dtype=torch.int32, device="cuda") for p in plan))
        prefix_lens, sizes = shared_prefixes
        most = max(PREFIX_SPLITS)
        pre_m, pre_l = (torch.empty(*q.shape[:2], most, dtype=torch.float32, device="cuda") for _ in range(2))
        pre_acc = torch.empty(*q.shape[:2], most, d, dtype=torch.float32, device="cuda")
        own_bt = bt[:, prompt // k.shape[1]:].contiguous()
        own_lens = lens - prompt

        def plain():
            return tp.decode_attention(q, k, v, bt, lens, scale)

        def shared(splits=None):
            return tp.decode_attention(q, k, v, bt, lens, scale, num_splits=1, shared_prefixes=shared_prefixes,
                                       prefix_splits=splits)

        def shared_gather(splits=None):
            tma_ok = tp._tma_decode_ok
            tp._tma_decode_ok = lambda *_: False
            try:
                return shared(splits)
            finally:
                tp._tma_decode_ok = tma_ok

        def prefix_pass(config=None, splits=1):
            tp._shared_prefix_config = default_config if config is None else (lambda *_: config)
            try:
                bd = triton.next_power_of_2(d)
                tp._shared_prefix_kernel[(batch, kvh, splits)](
                    q, k, v, bt, prefix_lens, sizes, pre_m, pre_l, pre_acc, scale * tp._LOG2E, batch,
                    q.stride(0), q.stride(1), bt.stride(0), k.stride(0), k.stride(1), k.stride(2),
                    v.stride(0), v.stride(1), v.stride(2), NUM_HEADS=q.shape[1], GROUP=group, BLOCK_SIZE=k.shape[1],
                    HEAD_DIM=d, BLOCK_R=tp.SHARED_PREFIX_ROWS, BLOCK_D=bd, PREFIX_SPLITS=splits, DOT_PREC="tf32",
                    **tp._shared_prefix_config(bd, q.dtype))
            finally:
                tp._shared_prefix_config = default_config

        def own_keys():
            return tp.decode_attention(q, k, v, own_bt, own_lens, scale)

        # The same cache in the head-major layout [blocks, KVH, block_size, D], seen through a [blocks, block_size,
        # KVH, D] view: each (block, KV head) is one contiguous run of block_size * D elements.
        k_hnd = k.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
        v_hnd = v.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)

        def plain_hnd(launch=None):
            tp._decode_config = decode_config if launch is None else (lambda *_: launch)
            try:
                return tp.decode_attention(q, k_hnd, v_hnd, bt, lens, scale)
            finally:
                tp._decode_config = decode_config

        want = plain().float()
        for splits in PREFIX_SPLITS + [None]:
            torch.testing.assert_close(shared(splits).float(), want, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(shared_gather().float(), want, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(plain_hnd().float(), want, atol=0, rtol=0)
        row = {"shape": name, "plan_groups": sum(s > 1 for s in plan[1]),
               "auto_splits": tp.choose_prefix_splits(batch, kvh, group, q.device)}
        timings = [("plain", plain), ("shared-auto", shared), ("shared-auto-gather", shared_gather),
                   ("plain-hnd", plain_hnd), ("own-keys", own_keys)]
        for splits in PREFIX_SPLITS:
            timings += [(f"shared-s{splits}", lambda n=splits: shared(n)),
                        (f"prefix-pass-s{splits}", lambda n=splits: prefix_pass(splits=n))]
        for spec in PREFIX_CONFIGS:
            bn, w, st = (int(x) for x in spec.split(":"))
            config = dict(BLOCK_N=bn, num_warps=w, num_stages=st)
            timings.append((f"prefix-pass-{spec}", lambda c=config: prefix_pass(c)))
        timings.append(("plain-again", plain))
        for label, fn in timings:
            us = time_graphed(fn, name, label, rep=60)
            if us is None:
                continue
            row[label] = us
            print(f"{name:18} {label:22} {us:8.1f} us", flush=True)
        result["shapes"].append(row)
        Path(args.out, "shared_prefix_probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
