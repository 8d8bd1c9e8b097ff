"""The lowest time a card allows for a workload: the bytes that must move over the measured copy bandwidth, or
the FLOPs over the measured matmul rate, whichever is larger.

Bytes. Decode step t (t = 0 .. longest max_tokens - 1) must read every weight once, and every KV byte that the
step's attention needs at least once::

    bytes(t) = P * b                                      weights (P parameters in matrix products, b bytes
                                                          each: an untied input embedding is only gathered)
             + G(t) * L_p * kv                            each running prompt's KV, once for its group
             + S(t) * t * kv                              each running sequence's own generated tokens

where G(t) is the number of prompts with a sample still running at step t, S(t) the number of running sequences
(G(t) * n for fixed lengths), L_p the prompt length and kv = 2 (K and V) * layers * KV heads * head_dim * b
the bytes of one token's KV. The n samples of a prompt share its prompt blocks (prefix caching stores them
once), so the floor charges them once per step: a kernel that attends the n samples together (a cascade or
shared-prefix decode) reads them once, and a per-sequence kernel reading them n times mostly hits the L2 cache
for the other n - 1, since the samples of a prompt run in the same step. Charging the prompt KV once per
sequence (``bytes_if_each_sequence_reads_its_prompt``, reported beside) would raise the floor above what such a
kernel needs and flatter the roofline fraction.

FLOPs: 2 * P * (prompt tokens, computed once per prompt, + generated tokens); attention FLOPs are left out,
which can only lower the floor.
"""

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
    """The floor of the module docstring. ``max_tokens``: one entry per prompt (bandwidth in bytes/s, flops in
    FLOP/s)."""
    hidden, layers = arch["hidden_size"], arch["num_hidden_layers"]
    heads, kv_heads = arch["num_attention_heads"], arch["num_key_value_heads"]
    head_dim = arch.get("head_dim") or hidden // heads
    inter, vocab = arch["intermediate_size"], arch["vocab_size"]
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden + 3 * hidden * inter
    embed = vocab * hidden * (1 if arch.get("tie_word_embeddings") else 2)
    params = layers * per_layer + embed
    # An untied input embedding is gathered row by row, never read whole: the LM head is the matrix a step reads.
    matmul_params = params - (0 if arch.get("tie_word_embeddings") else vocab * hidden)
    kv_per_token = 2 * layers * kv_heads * head_dim * bytes_per_param
    lengths = sorted(max_tokens)
    weight_bytes = matmul_params * bytes_per_param
    total_bytes = per_sequence_bytes = 0
    for t in range(max(lengths)):
        prompts_running = sum(1 for m in lengths if m > t)
        running = prompts_running * n
        own = running * t * kv_per_token
        total_bytes += weight_bytes + prompts_running * prompt_len * kv_per_token + own
        per_sequence_bytes += weight_bytes + running * prompt_len * kv_per_token + own
    tokens = num_prompts * prompt_len + sum(max_tokens) * n
    memory_s = total_bytes / bandwidth
    compute_s = 2 * matmul_params * tokens / flops
    return {"params": params, "matmul_params": matmul_params, "bytes": total_bytes, "memory_seconds": memory_s,
            "compute_seconds": compute_s,
            "floor_seconds": max(memory_s, compute_s),
            "bytes_if_each_sequence_reads_its_prompt": per_sequence_bytes,
            "floor_seconds_if_each_sequence_reads_its_prompt": max(per_sequence_bytes / bandwidth, compute_s)}
