"""What every tensor-parallel rank builds the same way: the model shard, its runtime facts, its model runner
with a KV cache sized from memory (the same number of blocks on every rank) and the decode CUDA graphs.

Rank 0 wraps the result in an ``EngineCore`` (scheduler, sampler); ranks > 0 only run forwards
(``rlserve.distributed.tp_engine``). The steps below issue collectives in the same order on every rank.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlserve.config import EngineConfig, RuntimeInfo
from rlserve.distributed.parallel import TensorParallel
from rlserve.engine.runner import ModelRunner
from rlserve.models.llama import head_dim_of
from rlserve.models.loader import load_config, load_model, resolve_dtype, resolve_model_dir

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model_dir: Path
    hf_config: object
    model: torch.nn.Module
    info: RuntimeInfo
    runner: ModelRunner
    startup_seconds: dict = field(default_factory=dict)


def eos_token_ids(model_dir: Path, config) -> tuple[int, ...]:
    import json
    ids = None
    gen = model_dir / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id")
    if ids is None:
        ids = getattr(config, "eos_token_id", None)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def max_model_len_for(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True) and window < limit:
        limit = window  # no sliding-window attention here: stay within the window
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit ({limit})")
    return config.max_model_len


def check_tensor_parallel(hf_config, tp_size: int) -> None:
    """Fail early, with the numbers, when the model cannot be split ``tp_size`` ways."""
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
    for name, value in (("num_attention_heads", hf_config.num_attention_heads), ("num_key_value_heads", kv_heads),
                        ("intermediate_size", hf_config.intermediate_size)):
        if value % tp_size:
            raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's {name} ({value})")


def load_worker(config: EngineConfig, tp: TensorParallel, attention_backend: str = "auto") -> LoadedModel:
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(config.model, config.revision)
    hf_config = load_config(model_dir, config.trust_remote_code)
    check_tensor_parallel(hf_config, tp.size)
    device = config.resolved_device()
    if device.type == "cuda":  # with its index: tensors report "cuda:0", and torch.device("cuda") != "cuda:0"
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
    dtype = resolve_dtype(config.dtype, hf_config, device)
    max_model_len = max_model_len_for(config, hf_config)
    model = load_model(model_dir, hf_config, dtype, device, tp, config.load_format, max_position=max_model_len)
    t_load = time.perf_counter()
    on_gpu = device.type == "cuda"
    info = RuntimeInfo(
        device=device, dtype=dtype, vocab_size=hf_config.vocab_size,
        max_model_len=max_model_len, num_kv_blocks=0, block_size=config.block_size,
        max_num_seqs=config.max_num_seqs or (512 if on_gpu else 256),
        max_num_batched_tokens=config.max_num_batched_tokens or (8192 if on_gpu else 2048),
        eos_token_ids=eos_token_ids(model_dir, hf_config), model_name=config.model,
        architecture=type(model).__name__, num_layers=hf_config.num_hidden_layers,
        num_kv_heads=model.attention_layers[0].num_kv_heads, head_dim=head_dim_of(hf_config))
    runner = ModelRunner(config, info, model, 1, attention_backend, tp)
    try:
        info.num_kv_blocks = agreed_kv_blocks(config, info, runner, tp)
        runner.reallocate_kv_cache(info.num_kv_blocks)
        t_graphs = time.perf_counter()
        runner.capture_cuda_graphs()
    except BaseException:
        model = None  # the traceback keeps this frame: a caller retrying with a smaller share finds the card free
        runner.free_device_memory()
        raise
    t_end = time.perf_counter()
    return LoadedModel(model_dir, hf_config, model, info, runner,
                       {"load": round(t_load - t0, 3), "cuda_graphs": round(t_end - t_graphs, 3),
                        "total": round(t_end - t0, 3)})


def agreed_kv_blocks(config: EngineConfig, info: RuntimeInfo, runner: ModelRunner, tp: TensorParallel) -> int:
    """The KV blocks every tensor-parallel rank can hold. A rank whose sizing fails (a refused share, no room)
    still takes part in the agreement, with -1: raising before it would leave the other ranks waiting in it."""
    failure = None
    try:
        blocks = num_kv_blocks(config, info, runner)
    except (ValueError, torch.OutOfMemoryError) as e:
        failure, blocks = e, -1
    agreed = tp.min_int(blocks)
    if failure is not None:
        raise failure
    if blocks < 1:
        raise RuntimeError("no memory left for the KV cache: lower max_model_len or raise gpu_memory_utilization")
    if agreed < 1:
        raise RuntimeError("another tensor-parallel rank found no room for its KV cache (its log says why)")
    return agreed


def num_kv_blocks(config: EngineConfig, info: RuntimeInfo, runner: ModelRunner) -> int:
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = ModelRunner.kv_block_bytes(info, info.dtype)
    wanted = info.max_num_seqs * -(-info.max_model_len // info.block_size)
    if info.device.type == "cuda":
        return int(runner.profile_free_memory(config.gpu_memory_utilization) // block_bytes)
    return min(int(config.cpu_kv_cache_gb * 2**30 // block_bytes), wanted)
