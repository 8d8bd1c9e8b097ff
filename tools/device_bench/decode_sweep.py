"""Time decode attention at a workload's shape over launch configurations (H200 tuning, not a test).

python tools/device_bench/decode_sweep.py --out DIR: B sequences in groups of n samples sharing a prompt of P
keys (forked: the same cache blocks), each with its own C generated keys; 7B (KVH 4, G 7) and 0.5B (KVH 2,
G 7) shapes, bf16, block size 16. Times decode_attention without and with shared-prefix groups for each
config of _decode_config / _prefix_config (patched), with triton.testing.do_bench; writes a JSON table."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp
from rlserve.engine.runner import shared_prefixes

SHAPES = {  # name: (batch, n, kv_heads, group, prompt, generated so far)
    "7b-ctx786": (256, 8, 4, 7, 256, 530),
    "7b-ctx1100": (256, 8, 4, 7, 256, 844),
    "0.5b-ctx384": (512, 8, 2, 7, 128, 256),
}


def build(batch, n, kvh, group, prompt, gen, bs=16, d=128, dtype=torch.bfloat16):
    prompt_blocks, own = prompt // bs, -(-(gen + 1) // bs)
    num_blocks = 1 + (batch // n) * prompt_blocks + batch * own
    k = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    order = torch.randperm(num_blocks - 1).add_(1).tolist()
    tables = []
    for _ in range(batch // n):
        shared = [order.pop() for _ in range(prompt_blocks)]
        tables += [shared + [order.pop() for _ in range(own)] for _ in range(n)]
    seq_lens = [prompt + gen + 1] * batch
    bt = torch.tensor(tables, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kvh * group, d, device="cuda", dtype=dtype)
    gs = tp.shared_prefix_group_size(group)
    groups, lens = shared_prefixes(tables, seq_lens, bs, gs)
    kv_starts = [0] * batch
    for g, m in zip(groups, lens):
        for i in g:
            kv_starts[i] = m
    pg = torch.full((max(1, batch // 2), gs), -1, dtype=torch.int32)
    for i, g in enumerate(groups):
        pg[i, :len(g)] = torch.tensor(g)
    pl = torch.zeros(max(1, batch // 2), dtype=torch.int32)
    pl[:len(lens)] = torch.tensor(lens)
    lens_t = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    prefix = dict(kv_starts=torch.tensor(kv_starts, dtype=torch.int32, device="cuda"), prefix_groups=pg.cuda(),
                  prefix_lens=pl.cuda())
    return q, k, v, bt, lens_t, prefix


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    args = parser.parse_args()
    rows = []
    orig_decode, orig_prefix = tp._decode_config, tp._prefix_config
    for name, shape in SHAPES.items():
        q, k, v, bt, lens, prefix = build(*shape)
        scale = 128 ** -0.5
        ref = tp.decode_attention(q, k, v, bt, lens, scale)
        got = tp.decode_attention(q, k, v, bt, lens, scale, **prefix)
        err = (ref.float() - got.float()).abs().max().item()
        batch, kvh = shape[0], shape[2]
        useful = (batch // shape[1] * shape[4] + batch * (shape[5] + 1)) * kvh * 128 * 2 * 2
        full = batch * (shape[4] + shape[5] + 1) * kvh * 128 * 2 * 2
        for bn, warps, stages in itertools.product([32, 64, 128], [2, 4, 8], [1, 2, 3, 4]):
            tp._decode_config = lambda block_d, dtype, c=dict(BLOCK_N=bn, num_warps=warps, num_stages=stages): c
            try:
                plain = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale), warmup=5, rep=40)
            except Exception as e:  # out of shared memory etc.
                plain = None
            rows.append(dict(shape=name, kernel="decode", BLOCK_N=bn, num_warps=warps, num_stages=stages,
                             us=None if plain is None else plain * 1e3,
                             tbps_full=None if plain is None else full / plain / 1e9))
        tp._decode_config = orig_decode
        for bn, warps, stages in itertools.product([32, 64, 128], [4, 8], [1, 2, 3]):
            tp._prefix_config = lambda br, bd, dt, c=dict(BLOCK_N=bn, num_warps=warps, num_stages=stages): c
            try:
                shared = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale, **prefix),
                                                 warmup=5, rep=40)
            except Exception:
                shared = None
            rows.append(dict(shape=name, kernel="shared(prefix cfg)", BLOCK_N=bn, num_warps=warps,
                             num_stages=stages, us=None if shared is None else shared * 1e3,
                             tbps_useful=None if shared is None else useful / shared / 1e9))
        tp._prefix_config = orig_prefix
        best = {kind: min((r for r in rows if r["shape"] == name and r["kernel"] == kind and r["us"]),
                          key=lambda r: r["us"]) for kind in ("decode", "shared(prefix cfg)")}
        default = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale), warmup=5, rep=40)
        default_shared = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale, **prefix),
                                                 warmup=5, rep=40)
        print(f"{name}: max err shared vs plain {err:.2e}; default plain {default * 1e3:.1f} us, default shared "
              f"{default_shared * 1e3:.1f} us; best plain {best['decode']}; best shared {best['shared(prefix cfg)']}"
              f"; bytes full {full / 1e6:.0f} MB useful {useful / 1e6:.0f} MB", flush=True)
    Path(args.out, "decode_sweep.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
