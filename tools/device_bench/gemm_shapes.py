"""Time the decode step's matmuls alone at a model's shapes, cuBLAS against cuBLASLt (H200 tuning, not a test).

python tools/device_bench/gemm_shapes.py --out DIR [--tokens 256,512]: for each linear layer of the Qwen2.5-7B and
0.5B shapes (QKV with bias, O, gate+up, down, LM head) and each token count, ``F.linear`` in bf16 under
``torch.backends.cuda.preferred_blas_library`` "cublas" and "cublaslt", timed by ``triton.testing.do_bench`` with
the L2 flushed between runs (a decode step reads each weight once). Reports µs, TFLOP/s and the weight read rate;
the first backend is timed again last, so that the run's own drift (power capping) shows beside the differences.
JSON in DIR/gemm_shapes.json. It tells whether a backend choice or a tuned kernel has room at rl-7b's step, where
the seventh session's profile had QKV at 468 and O at 512 TFLOP/s against gate+up's 735.

--triton also times triton_gemm.py's split-K GEMM under every config of its CONFIGS (shorter do_bench runs; a
config that fails to compile or run, e.g. out of shared memory, gets None) after checking each config's output
against F.linear, and records the fastest as ``triton_best``. --layers qkv,o,down limits the layers timed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

import triton_gemm  # this folder is on sys.path when the script runs

SHAPES = {  # model: {layer: (out features, in features, bias)}
    "7b": {"qkv": (4608, 3584, True), "o": (3584, 3584, False), "gate_up": (37888, 3584, False),
           "down": (3584, 18944, False), "lm_head": (152064, 3584, False)},
    "0.5b": {"qkv": (1152, 896, True), "o": (896, 896, False), "gate_up": (9728, 896, False),
             "down": (896, 4864, False), "lm_head": (151936, 896, False)},
}
BACKENDS = ("cublas", "cublaslt")


def make_inputs(tokens: int, out_f: int, in_f: int, bias: bool):
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * in_f ** -0.5
    b = torch.randn(out_f, device="cuda", dtype=torch.bfloat16) if bias else None
    return x, w, b


def time_linear(tokens: int, out_f: int, in_f: int, bias: bool, backend: str) -> float:
    torch.backends.cuda.preferred_blas_library(backend)
    x, w, b = make_inputs(tokens, out_f, in_f, bias)
    return triton.testing.do_bench(lambda: F.linear(x, w, b), warmup=50, rep=300)  # ms, mean (do_bench's default)


def stats(ms: float, tokens: int, out_f: int, in_f: int) -> dict:
    return {"us": round(ms * 1e3, 2), "tflops": round(2 * tokens * out_f * in_f / ms / 1e9, 1),
            "weight_tb_s": round(2 * out_f * in_f / ms / 1e9, 2)}


def time_triton(tokens: int, out_f: int, in_f: int, bias: bool) -> tuple[dict | None, dict]:
    """(fastest config's stats or None, config name -> µs or None) over triton_gemm.CONFIGS.

    A config whose output is off from F.linear by 2e-2 of the output scale or more is an error, not a timing. Each
    check takes a fresh x, so an output buffer that the allocator hands back still holding the previous config's
    result cannot pass for a kernel that left it unwritten."""
    x, w, b = make_inputs(tokens, out_f, in_f, bias)
    times = {}  # config name -> ms or None
    for cfg in triton_gemm.CONFIGS:
        name = triton_gemm.config_name(cfg)
        try:
            x_check = torch.randn_like(x)
            ref = F.linear(x_check, w, b).float()
            err = (triton_gemm.linear(x_check, w, b, **cfg).float() - ref).abs().max().item() / ref.abs().max().item()
            if err >= 2e-2:
                raise RuntimeError(f"output off by {err:.3g} of its scale")
            ms = triton.testing.do_bench(lambda: triton_gemm.linear(x, w, b, **cfg), warmup=10, rep=50)
        except Exception as e:  # out of resources, compile errors, wrong results: no timing for this config
            print(f"  triton {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            times[name] = None
            continue
        times[name] = ms
    all_us = {name: None if ms is None else round(ms * 1e3, 2) for name, ms in times.items()}
    timed = {name: ms for name, ms in times.items() if ms is not None}
    if not timed:
        return None, all_us
    name = min(timed, key=timed.get)
    return {"config": name, **stats(timed[name], tokens, out_f, in_f)}, all_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="256,512")
    parser.add_argument("--layers", default=",".join(SHAPES["7b"]), help="comma-separated, e.g. qkv,o,down")
    parser.add_argument("--triton", action="store_true", help="also time triton_gemm.py's configs")
    parser.add_argument("--models", default=",".join(SHAPES), help="comma-separated, e.g. 7b")
    args = parser.parse_args()
    token_counts = [int(t) for t in args.tokens.split(",")]
    wanted = args.layers.split(",")
    if unknown := set(wanted) - set(SHAPES["7b"]):
        parser.error(f"unknown layers {sorted(unknown)}; known: {list(SHAPES['7b'])}")
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for model, layers in SHAPES.items():
        if model not in args.models.split(","):
            continue
        for tokens in token_counts:
            for layer, (out_f, in_f, bias) in layers.items():
                if layer not in wanted:
                    continue
                row = {"model": model, "layer": layer, "tokens": tokens, "out": out_f, "in": in_f, "bias": bias}
                for backend in (*BACKENDS, BACKENDS[0]):
                    key = backend if backend not in row else f"{backend}_again"
                    row[key] = stats(time_linear(tokens, out_f, in_f, bias, backend), tokens, out_f, in_f)
                if args.triton:
                    row["triton_best"], row["triton_us"] = time_triton(tokens, out_f, in_f, bias)
                rows.append(row)
                best = row.get("triton_best")
                print(f"{model:5} {layer:8} M={tokens:4} " + "  ".join(
                    f"{k}: {v['us']:8.1f} us {v['tflops']:6.1f} TF/s" for k, v in row.items()
                    if isinstance(v, dict) and "tflops" in v) + (f" ({best['config']})" if best else ""), flush=True)
                # after each row: a run cut short keeps what it measured
                (out / "gemm_shapes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                                  "rows": rows}, indent=2))
    torch.backends.cuda.preferred_blas_library("cublas")


if __name__ == "__main__":
    main()
