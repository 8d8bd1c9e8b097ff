"""The engine's host work per decode step, on CPU: ``python tools/host_step_cpu.py [PROMPTS] [MODE]``.

A one-layer, 64-wide model (its forward is cheap) with an RL-shaped batch -- PROMPTS prompts x 8 samples, 128
prompt tokens, 512 generated, seeded -- through ``rlserve.bench.profile_step``: schedule, build inputs, sampling
inputs, apply tokens and the rest of the step are the host's share of a step, the part that async scheduling must
hide behind the GPU's. 64 prompts = rl-small's 512 sequences, 32 = one DP=2 replica's half."""

from __future__ import annotations

import sys

import torch

from rlserve.bench.profile_step import profile
from rlserve.bench.workloads import Workload

HOST_MODEL = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, vocab_size=1024, max_position_embeddings=2048, tie_word_embeddings=True)

if __name__ == "__main__":
    torch.set_num_threads(1)
    prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    workload = Workload(f"host-{prompts}x8", HOST_MODEL, prompts, 8, 128, 512, device="cpu")
    profile(workload, steps=60, mode_name=sys.argv[2] if len(sys.argv) > 2 else "seeded",
            output=f"bench_results/host-step-{prompts}x8.json", device="cpu",
            engine_kwargs=dict(max_num_seqs=max(256, prompts * 8)))
