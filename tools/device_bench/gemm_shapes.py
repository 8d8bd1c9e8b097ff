"""Time the decode step's matmuls alone at a model's shapes, cuBLAS against cuBLASLt (H200 tuning, not a test).

python tools/device_bench/gemm_shapes.py --out DIR [--tokens 256,512]: for each linear layer of the Qwen2.5-7B and
0.5B shapes (QKV with bias, O, gate+up, down, LM head) and each token count, ``F.linear`` in bf16 under
``torch.backends.cuda.preferred_blas_library`` "cublas" and "cublaslt", timed by ``triton.testing.do_bench`` with
the L2 flushed between runs (a decode step reads each weight once). Reports µs, TFLOP/s and the weight read rate;
the first backend is timed again last, so that the run's own drift (power capping) shows beside the differences.
JSON in DIR/gemm_shapes.json. It tells whether a backend choice or a tuned kernel has room at rl-7b's step, where
the seventh session's profile had QKV at 468 and O at 512 TFLOP/s against gate+up's 735."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

SHAPES = {  # model: {layer: (out features, in features, bias)}
    "7b": {"qkv": (4608, 3584, True), "o": (3584, 3584, False), "gate_up": (37888, 3584, False),
           "down": (3584, 18944, False), "lm_head": (152064, 3584, False)},
    "0.5b": {"qkv": (1152, 896, True), "o": (896, 896, False), "gate_up": (9728, 896, False),
             "down": (896, 4864, False), "lm_head": (151936, 896, False)},
}
BACKENDS = ("cublas", "cublaslt")


def time_linear(tokens: int, out_f: int, in_f: int, bias: bool, backend: str) -> float:
    torch.backends.cuda.preferred_blas_library(backend)
    x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * in_f ** -0.5
    b = torch.randn(out_f, device="cuda", dtype=torch.bfloat16) if bias else None
    return triton.testing.do_bench(lambda: F.linear(x, w, b), warmup=50, rep=300)  # ms, median


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="256,512")
    args = parser.parse_args()
    token_counts = [int(t) for t in args.tokens.split(",")]
    rows = []
    for model, layers in SHAPES.items():
        for tokens in token_counts:
            for layer, (out_f, in_f, bias) in layers.items():
                row = {"model": model, "layer": layer, "tokens": tokens, "out": out_f, "in": in_f, "bias": bias}
                for backend in (*BACKENDS, BACKENDS[0]):
                    ms = time_linear(tokens, out_f, in_f, bias, backend)
                    key = backend if backend not in row else f"{backend}_again"
                    row[key] = {"us": round(ms * 1e3, 2), "tflops": round(2 * tokens * out_f * in_f / ms / 1e9, 1),
                                "weight_tb_s": round(2 * out_f * in_f / ms / 1e9, 2)}
                rows.append(row)
                print(f"{model:5} {layer:8} M={tokens:4} " + "  ".join(
                    f"{k}: {v['us']:8.1f} us {v['tflops']:6.1f} TF/s" for k, v in row.items() if isinstance(v, dict)),
                    flush=True)
    torch.backends.cuda.preferred_blas_library("cublas")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemm_shapes.json").write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                     indent=2))


if __name__ == "__main__":
    main()
