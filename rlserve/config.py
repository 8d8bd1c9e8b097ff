"""Engine configuration: one frozen dataclass built at the edge (CLI or ``LLM(...)``) and passed whole.

Facts learned at run time (KV block count, EOS ids, vocabulary size, the resolved device and dtype) live in
``RuntimeInfo``, set once after the model is loaded and the KV cache is sized, never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {
    "auto": None,
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
}


@dataclass(frozen=True)
class EngineConfig:
    model: str
    revision: str | None = None
    tokenizer: str | None = None  # defaults to the model
    dtype: str = "auto"
    device: str | None = None  # None: CUDA when present, else CPU
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    seed: int | None = 0  # the request-seed generator's; None: fresh OS entropy (see EngineCore)
    data_parallel_rank: int = 0  # which replica this engine is (its request seeds differ from the others')
    block_size: int = 16
    max_num_seqs: int | None = None  # None: 512 on CUDA, 256 on CPU
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 2048 on CPU
    num_kv_blocks: int | None = None  # force the KV capacity (tests); None: sized from memory
    cpu_kv_cache_gb: float = 2.0  # KV cache budget on CPU
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (benchmarks)
    max_logprobs: int = 20  # -1: no cap (what TRL >= 1.12 starts vLLM with, for distillation's top-k)
    trust_remote_code: bool = False  # for AutoConfig / AutoTokenizer only: rlserve runs its own model code
    # The fused Triton kernels for add+RMSNorm, rotary and SiLU-and-mul on CUDA, where they pass their self-check
    # (layers/fused.py); False: PyTorch's per-layer ops (for comparisons). The model runner applies it once.
    fused_kernels: bool = True
    # Overlap the host's work with the device's (vLLM's --async-scheduling): step t+1 is scheduled and launched
    # before step t's tokens are applied, which are fed to it on the device (engine/async_step.py). Outputs equal
    # sync mode's in the CPU tests and its GPU test; on a GPU other batch shapes can change logits in the last bits.
    # None (the default): on where the engine runs on CUDA, as in vLLM, off on CPU, where host and "device" are the
    # same cores and there is nothing to overlap (``resolved_async_scheduling``).
    async_scheduling: bool | None = None
    # Up to this many decode steps per launch (vLLM V0's --num-scheduler-steps): a step whose sequences all decode
    # plainly (engine/multi_step.py says which) runs them back to back on the device, each feeding its draws to the
    # next, and the host applies the tokens once: the host's work per token shrinks. The draws are counter-based: the
    # same tokens as one step at a time where the batches are the same (a sample that ends inside a burst keeps its
    # row to the end; on a GPU that can change others' logits in the last bits).
    num_scheduler_steps: int = 1
    # Decode rows that share at least this many prompt tokens (a prompt's samples) read them once a group, where the
    # attention backend can (Triton); 0: never. Measured on one H200, one round each: +11% at 2,048-token prompts
    # (49ded3f), +10% again at 7cfc3f0 (BENCHMARKS, seventeenth and nineteenth sessions); decode attention alone under
    # CUDA graphs took 15% less time at 1,024-token prompts and 35% less at 2,048 (e90b5ac), the same at 512 with 16
    # samples a prompt, 9% more at 256 (the samples' re-reads are cheap there), where the engine was even.
    shared_prefix_min_tokens: int = 1024
    extra: dict = field(default_factory=dict)

    def logprobs_limit(self, vocab_size: int) -> int:
        """The most top logprobs a request may ask for: max_logprobs; with -1 ("no cap", vLLM's spelling), the
        same bound as prompt logprobs (1000, or the vocabulary if smaller) -- a top-k over the whole vocabulary
        on every row of a step would take ~1 GB of KV room in the memory profile and millions of host tuples a
        step, for a distribution TRL's distillation reads the top 100 of."""
        from rlserve.sampling import MAX_PROMPT_LOGPROBS
        return min(vocab_size, MAX_PROMPT_LOGPROBS) if self.max_logprobs < 0 else self.max_logprobs

    def __post_init__(self):
        if not self.model:
            raise ValueError("model must be a non-empty path or hub id")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be >= 1, got {self.num_scheduler_steps}")
        if self.shared_prefix_min_tokens < 0:
            raise ValueError(f"shared_prefix_min_tokens must be >= 0 (0: off), got {self.shared_prefix_min_tokens}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.data_parallel_rank < 0:
            raise ValueError(f"data_parallel_rank must be >= 0, got {self.data_parallel_rank}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.cpu_kv_cache_gb <= 0:
            raise ValueError(f"cpu_kv_cache_gb must be > 0, got {self.cpu_kv_cache_gb}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device {self.device!r} is not a valid torch device") from e

    def resolved_device(self) -> torch.device:
        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_async_scheduling(self) -> bool:
        """Whether the engine overlaps host and device: the flag as given, or where unset, whether it runs on CUDA.
        Resolved where the engine runs, from its own device."""
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.resolved_device().type == "cuda"


@dataclass
class RuntimeInfo:
    """Values found while starting the engine; set once, read everywhere."""
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    eos_token_ids: tuple[int, ...]
    model_name: str
    architecture: str
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    startup_seconds: dict = field(default_factory=dict)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    def summary(self) -> dict:
        return {
            "model": self.model_name, "architecture": self.architecture, "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."), "vocab_size": self.vocab_size,
            "max_model_len": self.max_model_len, "num_kv_blocks": self.num_kv_blocks,
            "block_size": self.block_size, "kv_capacity_tokens": self.kv_capacity_tokens,
            "max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
            "eos_token_ids": list(self.eos_token_ids),
        }
