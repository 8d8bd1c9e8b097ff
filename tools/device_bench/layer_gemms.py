"""The 7B decode step's linear layers in a CUDA graph, by weight layout and BLAS library (a device probe, not a test).

python tools/device_bench/layer_gemms.py --out DIR [--tokens 256] [--variants base,kn,lt,...]: 28 layers of the
Qwen2.5-7B decoder's chain as the engine runs it at decode -- add+RMSNorm, QKV (bias), rotary, a copy standing in
for attention, O, add+RMSNorm, gate+up, SiLU·mul, down -- captured in one CUDA graph per variant and replayed; µs per
layer from CUDA events (each variant timed --rounds times in a row; name a variant twice in --variants to alternate;
the first is timed again last, so that the card's drift shows), then torch.profiler over a few replays of each: µs
per layer by kernel, and the idle gaps by the kernels around them (timeline.py's analysis). The fourteenth
session's timeline found 6.6 µs of idle before each gate+up GEMM (cuBLAS's one cluster kernel) and a split-K reduce
after each down GEMM: this says whether another layout of a weight (``[in, out]`` contiguous: cuBLAS's other
transpose case), cuBLASLt or gate and up as two GEMMs give kernels without them.

A variant is a name in VARIANTS: for each linear layer, the weight layout ("nk": ``[out, in]``, F.linear's, the
engine's; "kn": ``[in, out]``, ``x @ w``; "two", gate+up only: two GEMMs on the halves of the ``[out, in]``
weight) and the BLAS library its call is captured under. JSON in DIR/layer_gemms.json."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rlserve.layers import fused
from timeline import analyse  # this folder is on sys.path when the script runs

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 3584, 28, 4, 128, 18944, 28
LINEARS = ("qkv", "o", "gate_up", "down")
SHAPES = {"qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o": (HIDDEN, HEADS * HEAD_DIM),
          "gate_up": (2 * INTER, HIDDEN), "down": (HIDDEN, INTER)}  # (out, in)
VARIANTS = {  # name: {linear: (layout, library)}; unnamed linears keep ("nk", "cublas")
    "base": {},
    "kn": {name: ("kn", "cublas") for name in LINEARS},
    "lt": {name: ("nk", "cublaslt") for name in LINEARS},
    "kn_lt": {name: ("kn", "cublaslt") for name in LINEARS},
    "gate_up_kn": {"gate_up": ("kn", "cublas")},
    "gate_up_lt": {"gate_up": ("nk", "cublaslt")},
    "down_kn": {"down": ("kn", "cublas")},
    "down_lt": {"down": ("nk", "cublaslt")},
    "qkv_o_kn": {"qkv": ("kn", "cublas"), "o": ("kn", "cublas")},
    "gate_up_two": {"gate_up": ("two", "cublas")},  # gate and up as two GEMMs on the fused weight's halves
}


class Layer:
    def __init__(self, choice: dict, dev: torch.device):
        self.choice = {name: choice.get(name, ("nk", "cublas")) for name in LINEARS}
        self.w = {}
        for name, (out_f, in_f) in SHAPES.items():
            w = torch.randn(out_f, in_f, device=dev, dtype=torch.bfloat16) * in_f ** -0.5
            self.w[name] = w.t().contiguous() if self.choice[name][0] == "kn" else w
        self.qkv_bias = torch.randn(SHAPES["qkv"][0], device=dev, dtype=torch.bfloat16) * 0.02
        self.norm_w = torch.ones(HIDDEN, device=dev, dtype=torch.bfloat16)

    def linear(self, name: str, x: torch.Tensor, bias=None) -> torch.Tensor:
        layout, library = self.choice[name]
        torch.backends.cuda.preferred_blas_library(library)  # read at the call, so per GEMM while capturing
        w = self.w[name]
        if layout == "nk":
            return F.linear(x, w, bias)
        return torch.addmm(bias, x, w) if bias is not None else x @ w

    def forward(self, x, residual, positions, cos, sin, attn_out):
        h = fused.add_rmsnorm(x, residual, self.norm_w, 1e-6)
        qkv = self.linear("qkv", h, self.qkv_bias)
        q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = q.view(-1, HEADS, HEAD_DIM), k.view(-1, KV_HEADS, HEAD_DIM)
        fused.rotary_(q, k, cos, sin, positions)
        attn_out.copy_(q.flatten(1))  # attention's stand-in: a kernel between rotary and O, as in the engine
        o = self.linear("o", attn_out)
        h = fused.add_rmsnorm(o, residual, self.norm_w, 1e-6)
        if self.choice["gate_up"][0] == "two":
            w, half = self.w["gate_up"], INTER
            return self.linear("down", fused.silu_mul_parts(F.linear(h, w[:half]), F.linear(h, w[half:])))
        return self.linear("down", fused.silu_mul(self.linear("gate_up", h)))


def build(variant: str, tokens: int, dev: torch.device):
    layers = [Layer(VARIANTS[variant], dev) for _ in range(LAYERS)]
    x = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
    residual = torch.randn(tokens, HIDDEN, device=dev, dtype=torch.bfloat16)
    positions = torch.randint(0, 2048, (tokens,), device=dev)
    angles = torch.arange(4096, device=dev)[:, None] * torch.rand(HEAD_DIM // 2, device=dev)[None]
    cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)
    attn_out = torch.empty(tokens, HEADS * HEAD_DIM, device=dev, dtype=torch.bfloat16)

    def step():
        h = x
        for layer in layers:
            h = layer.forward(h, residual, positions, cos, sin, attn_out)
        return h

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()  # warm up: Triton compiles, cuBLAS picks its kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.backends.cuda.preferred_blas_library("cublas")
    return graph, layers


def time_graph(graph, replays: int) -> float:
    """µs per layer, over ``replays`` replays after three."""
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / replays / LAYERS


def profile_graph(graph, replays: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    trace = Path("/tmp/layer-gemms-trace.json")
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    report = analyse(events)
    per = replays * LAYERS
    return {"per_layer_us": round(report["window_us"] / per, 2), "idle_us": round(report["idle_us"] / per, 2),
            "gaps": [[k, n, round(us / per, 2)] for k, n, us in report["gaps"][:8]],
            "kernels": [[k, round(us / per, 2)] for k, us in report["kernels"][:12]]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    dev = torch.device("cuda")
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    from rlserve.bench.bench import git_commit
    result = {"tokens": args.tokens, "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "device": torch.cuda.get_device_name(dev), "runs": []}  # a variant named twice runs twice
    for name in names:  # one graph at a time: 28 layers of 7B weights are 13 GB
        graph, layers = build(name, args.tokens, dev)
        timings = [time_graph(graph, args.replays) for _ in range(args.rounds)]
        profiled = profile_graph(graph, 3)
        result["runs"].append({"variant": name, "choice": layers[0].choice,
                               "us_per_layer": [round(t, 2) for t in timings], **profiled})
        print(f"{name:11s} {' '.join(f'{t:7.2f}' for t in timings)} us/layer; profiled window "
              f"{profiled['per_layer_us']:.2f}, idle {profiled['idle_us']:.2f}")
        for k, n, us in profiled["gaps"][:3]:
            print(f"    gap {us:6.2f}  {k}")
        for k, us in profiled["kernels"][:6]:
            print(f"    {us:7.2f}  {k}")
        del graph, layers
        torch.cuda.empty_cache()
    first = names[0]  # timed again last: the drift of the call beside the differences
    graph, _ = build(first, args.tokens, dev)
    result["first_again_us_per_layer"] = round(time_graph(graph, args.replays), 2)
    print(f"{first} again: {result['first_again_us_per_layer']:.2f} us/layer")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "layer_gemms.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
