"""Time decode attention alone at a workload's shape over launch configurations (H200 tuning, not a test).

python tools/device_bench/decode_sweep.py --out DIR: B sequences in groups of n samples sharing a prompt of P
keys (forked: the same cache blocks), each with its own generated keys; the rl-7b (KVH 4, G 7, head dim 128) and
rl-small (KVH 2, G 7, head dim 64) shapes, bf16, block size 16. For each (BLOCK_N, num_warps, num_stages) of
_decode_config (patched), triton.testing.do_bench's time and the read rate of the whole contexts (the prompt
counted once per sample); the default config is timed twice (first and last), so that the run's own drift shows
beside the differences between configs. JSON in DIR/decode_sweep.json."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from rlserve.attention import triton_paged as tp

SHAPES = {  # name: (batch, n, kv_heads, group, prompt, generated so far, head dim)
    "rl-7b-ctx786": (256, 8, 4, 7, 256, 530, 128),
    "rl-7b-ctx1100": (256, 8, 4, 7, 256, 844, 128),
    "rl-small-ctx384": (512, 8, 2, 7, 128, 256, 64),
    # --candidates also times these: rl-medium, a batch a quarter full, and few sequences with long contexts
    "rl-medium-ctx768": (512, 8, 2, 6, 256, 512, 128),
    "rl-7b-b64-ctx786": (64, 8, 4, 7, 256, 530, 128),
    "rl-7b-b128-ctx786": (128, 8, 4, 7, 256, 530, 128),  # 512 programs: just under 4 a SM
    "rl-7b-b160-ctx786": (160, 8, 4, 7, 256, 530, 128),
    "b32-ctx2048": (32, 1, 4, 7, 2048, 0, 128),
    "b4-ctx8192": (4, 1, 8, 4, 8192, 0, 128),
}
CANDIDATES = ["32:2:4", "32:1:2", "16:1:3"]


def build(batch, n, kvh, group, prompt, gen, d, bs=16, dtype=torch.bfloat16):
    prompt_blocks, own = prompt // bs, -(-(gen + 1) // bs)
    num_blocks = 1 + (batch // n) * prompt_blocks + batch * own
    k = torch.randn(num_blocks, bs, kvh, d, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    order = torch.randperm(num_blocks - 1).add_(1).tolist()
    tables = []
    for _ in range(batch // n):
        shared = [order.pop() for _ in range(prompt_blocks)]
        tables += [shared + [order.pop() for _ in range(own)] for _ in range(n)]
    lens = torch.full((batch,), prompt + gen + 1, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, kvh * group, d, device="cuda", dtype=dtype)
    return q, k, v, torch.tensor(tables, dtype=torch.int32, device="cuda"), lens


def time_graphed(fn, name: str, label: str, calls: int = 1, rep: int = 100) -> float | None:
    """Median us of one of ``fn``'s ``calls`` kernel calls, ``fn`` replayed in a CUDA graph (do_bench_cudagraph: no
    host launch work in it); None, said so, where it fails (e.g. out of shared memory at a config)."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median") * 1e3 / calls
    except Exception as e:
        print(f"{name:18} {label:22} failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
        return None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--wide", action="store_true",
                        help="instead: 1 and 2 warps, 16- to 64-key tiles, 2-4 stages, 1, 3 and 4 splits (more, "
                             "smaller programs in flight), at --shapes")
    parser.add_argument("--candidates", action="store_true",
                        help="instead: CANDIDATES at every shape, each with choose_num_splits' splits and 2, 4 and 8 "
                             "times as many")
    parser.add_argument("--shapes", default=",".join(list(SHAPES)[:3]))
    args = parser.parse_args()
    if args.candidates:
        return candidates(args.out)
    rows = []
    default_config = tp._decode_config
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        q, k, v, bt, lens = build(*shape)
        head_dim = shape[6]
        scale = head_dim ** -0.5
        read = shape[0] * (shape[4] + shape[5] + 1) * shape[2] * head_dim * 2 * 2

        def bench(config=None, splits=None):
            tp._decode_config = default_config if config is None else (lambda *args: config)
            try:
                ms = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, scale, num_splits=splits),
                                             warmup=10, rep=50)
            except Exception:  # e.g. out of shared memory
                ms = None
            finally:
                tp._decode_config = default_config
            if config is None:  # what the default resolves to here (it depends on the program count)
                used = splits or tp.choose_num_splits(shape[0], shape[2], q.device)
                block_g = max(16, triton.next_power_of_2(shape[3]))
                config = dict(default_config(triton.next_power_of_2(head_dim), block_g, q.dtype,
                                             shape[0] * shape[2] * used, tp._sms(q.device)), default=True)
            return dict(shape=name, config=config, splits=splits or "default", us=ms and ms * 1e3,
                        tbps=ms and read / ms / 1e9)

        rows.append(bench())
        if args.wide:
            for bn, warps, stages, splits in itertools.product([16, 32, 64], [1, 2], [2, 3, 4], [1, 3, 4]):
                rows.append(bench(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages), splits=splits))
        for bn, warps, stages in itertools.product([32, 64, 128], [2, 4, 8], [2, 3]) if not args.wide else ():
            rows.append(bench(dict(BLOCK_N=bn, num_warps=warps, num_stages=stages)))
        rows.append(bench())
        mine = [r for r in rows if r["shape"] == name]
        best = min((r for r in mine if r["us"]), key=lambda r: r["us"])
        print(f"{name}: default {mine[0]['us']:.1f} us, again at the end {mine[-1]['us']:.1f} us; best {best}",
              flush=True)
        if args.wide:
            for r in sorted((r for r in mine if r["us"]), key=lambda r: r["us"])[:10]:
                print(f"  {r['us']:7.1f} us  {r['config']}  splits {r['splits']}", flush=True)
        # after each shape: a run cut short keeps what it measured
        Path(args.out, "decode_sweep.json").write_text(json.dumps(rows, indent=1))


def candidates(out: str) -> None:
    """CANDIDATES (BLOCK_N:WARPS:STAGES) at every shape of SHAPES, over splits; JSON after each shape."""
    rows, default_config = [], tp._decode_config
    for name, shape in SHAPES.items():
        q, k, v, bt, lens = build(*shape)
        batch, kvh, head_dim = shape[0], shape[2], shape[6]
        base = tp.choose_num_splits(batch, kvh, q.device)
        line = []
        for spec in ["64:4:3"] + CANDIDATES + ["64:4:3"]:  # the default first and last: the call's drift
            bn, warps, stages = spec.split(":")
            config = dict(BLOCK_N=int(bn), num_warps=int(warps), num_stages=int(stages))
            tp._decode_config = lambda *args, c=config: c
            best = None
            for splits in sorted({base, 2 * base, 4 * base, 8 * base}):
                try:
                    ms = triton.testing.do_bench(lambda: tp.decode_attention(q, k, v, bt, lens, head_dim ** -0.5,
                                                                              num_splits=splits), warmup=10, rep=50)
                except Exception:  # e.g. out of shared memory
                    continue
                rows.append(dict(shape=name, config=spec, splits=splits, us=ms * 1e3))
                if best is None or ms * 1e3 < best[0]:
                    best = (ms * 1e3, splits)
            tp._decode_config = default_config
            line.append(f"{spec} {best[0]:.1f} ({best[1]})" if best else f"{spec} -")
        print(f"{name} (default splits {base}): " + " | ".join(line), flush=True)
        Path(out, "decode_candidates.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
