"""The benchmark workloads of ../shared/WORKLOADS.md (and rl-7b-long, which it does not list): architecture, batch
shape, lengths.

Models are real architectures with random weights made from their configs; prompts are random token ids
from a fixed seed; every request runs at temperature 1.0, top_p 1.0 with ``ignore_eos`` so that output
lengths are fixed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=32768, initializer_range=0.02)
QWEN25_15B = dict(QWEN25_05B, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                  intermediate_size=8960)
QWEN25_7B = dict(QWEN25_05B, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                 intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
QWEN25_32B = dict(QWEN25_7B, hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                  intermediate_size=27648)
CPU_TINY = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                intermediate_size=1536, vocab_size=32000, tie_word_embeddings=True, max_position_embeddings=4096,
                initializer_range=0.02)


class BenchError(Exception):
    """A benchmark that cannot run as asked (an unknown mode, a baseline engine missing or failing): the command
    prints the message and exits 2, without a traceback."""


@dataclass(frozen=True)
class Workload:
    name: str
    architecture: dict = field(repr=False)
    num_prompts: int = 64
    n: int = 8
    prompt_len: int = 128
    max_tokens: int = 512
    min_max_tokens: int | None = None  # set: each prompt's max_tokens drawn from [min_max_tokens, max_tokens]
    device: str = "cuda"
    family: str = "qwen2"

    def prompts(self, seed: int = 0) -> list[list[int]]:
        rng = random.Random(seed)
        vocab = min(self.architecture["vocab_size"], 32000)
        return [[rng.randrange(0, vocab) for _ in range(self.prompt_len)] for _ in range(self.num_prompts)]

    def max_tokens_per_prompt(self, seed: int = 0) -> list[int]:
        if self.min_max_tokens is None:
            return [self.max_tokens] * self.num_prompts
        rng = random.Random(seed + 1)
        return [rng.randint(self.min_max_tokens, self.max_tokens) for _ in range(self.num_prompts)]

    @property
    def num_sequences(self) -> int:
        return self.num_prompts * self.n

    def num_generated_tokens(self, seed: int = 0) -> int:
        return sum(self.max_tokens_per_prompt(seed)) * self.n


@dataclass(frozen=True)
class Mode:
    """How the requests of a timed run sample: ``plain`` (no logprobs, no seed), ``logprobs0`` (the sampled
    token's logprob), ``seeded`` (logprobs=0 and a seed per request: the RL case)."""
    name: str
    logprobs: int | None
    is_seeded: bool


MODES = {m.name: m for m in [Mode("plain", None, False), Mode("logprobs0", 0, False), Mode("seeded", 0, True)]}


def request_params(workload: Workload, mode: Mode, seed: int = 0) -> list[dict]:
    """One engine-neutral sampling dict per prompt (rlserve's and vLLM's SamplingParams take these names):
    temperature 1, top_p 1, the prompt's max_tokens, ``ignore_eos`` so that lengths are fixed."""
    return [dict(n=workload.n, temperature=1.0, top_p=1.0, max_tokens=m, ignore_eos=True, logprobs=mode.logprobs,
                 seed=seed + i if mode.is_seeded else None)
            for i, m in enumerate(workload.max_tokens_per_prompt())]


WARM_UP_SEED = 1  # warm-up prompts come from another seed than the timed ones: nothing of them is cached
# The warm-up runs the whole batch (every prompt of WARM_UP_SEED, each with its n) for this many tokens: the
# prefill of the full batch, the decode at its full row count and, with --num_scheduler_steps 8, a whole burst
# -- so that whatever a first use costs (a kernel's compilation for a new shape, the allocator's first
# cudaMalloc of a size) is paid before the clock starts. A warm-up of 4 prompts left that to the first timed
# mode: rl-medium seeded, first after start, ran at 61k tokens/s against 75-77k for the same run later (H200).
WARM_UP_TOKENS = 16


WORKLOADS = {
    w.name: w for w in [
        Workload("rl-small", QWEN25_05B, 64, 8, 128, 512),
        Workload("rl-medium", QWEN25_15B, 64, 8, 256, 1024),
        Workload("rl-7b", QWEN25_7B, 32, 8, 256, 1024),
        Workload("rl-32b", QWEN25_32B, 16, 8, 256, 1024),
        # Not in WORKLOADS.md: rl-7b with 2k-token prompts (long system prompts, few-shot), where a prompt's samples
        # reading it once a group (the shared-prefix pass) pays; at 256-token prompts it did not.
        Workload("rl-7b-long", QWEN25_7B, 32, 8, 2048, 512),
        Workload("rl-varlen", QWEN25_05B, 64, 8, 128, 1024, min_max_tokens=32),
        Workload("cpu-tiny", CPU_TINY, 16, 4, 64, 64, device="cpu"),
    ]
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
