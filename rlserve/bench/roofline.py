"""The lowest time a card allows for a workload: bytes that must move (weights once per decode step plus the
KV cache of every running sequence) over the measured copy bandwidth, or the FLOPs over the measured matmul
rate, whichever is larger."""

from __future__ import annotations

import torch


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 * 2**30, repeats: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def measure_matmul_rate(device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large bf16 matrix product on random data."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size ** 3 / sorted(times)[len(times) // 2]


def roofline_seconds(arch: dict, prompt_len: int, num_prompts: int, n: int, max_tokens: list[int],
                     bytes_per_param: int, bandwidth: float, flops: float) -> dict:
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or hidden // heads
    inter, vocab = arch["intermediate_size"], arch["vocab_size"]
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    embed = vocab * hidden * (1 if arch.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embed
    kv_per_token = 2 * layers * kv_heads * head_dim * bytes_per_param
    # Decode step t reads all weights once and the context of every sequence still running.
    lengths = sorted(max_tokens)
    total_bytes = 0
    for t in range(max(lengths)):
        running = sum(n for m in lengths if m > t)
        total_bytes += params * bytes_per_param + running * (prompt_len + t) * kv_per_token
    tokens = num_prompts * prompt_len + sum(max_tokens) * n
    memory_s = total_bytes / bandwidth
    compute_s = 2 * params * tokens / flops
    return {"params": params, "bytes": total_bytes, "memory_seconds": memory_s, "compute_seconds": compute_s,
            "floor_seconds": max(memory_s, compute_s)}
