"""From a model name to a model on its device: resolve the directory (local or hub + revision), read the
config, build our implementation in the target dtype, and stream the safetensors shards into it."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

import torch

from rlserve.config import DTYPES
from rlserve.models.registry import model_class

# *.py: a repository's config / tokenizer code, run only with --trust_remote_code (small; never executed otherwise)
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt", "*.tiktoken", "*.py"]


def resolve_model_dir(model: str, revision: str | None = None) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/")):
        raise ValueError(f"model path {model!r} is not a directory")
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(model, revision=revision, allow_patterns=WEIGHT_PATTERNS))


def load_config(model_dir: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


def resolve_dtype(dtype: str, config, device: torch.device) -> torch.dtype:
    chosen = DTYPES[dtype]
    if chosen is not None:
        return chosen
    if device.type == "cpu":
        return torch.float32  # half-precision matmuls are slow and inexact on most CPUs
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored.removeprefix("torch."))
    return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(config, dtype: torch.dtype, device: torch.device, tp=None, max_position: int | None = None):
    from rlserve.distributed.parallel import SINGLE
    cls = model_class(config)
    with _default_dtype(dtype), torch.device(device):
        model = cls(config, tp or SINGLE, max_position)
    # Rotary tables stay float32 (built with explicit .float()), everything else is `dtype`.
    return model.eval()


def iter_safetensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    for name in files:
        with safe_open(os.fspath(model_dir / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def load_model(model_dir: Path, config, dtype: torch.dtype, device: torch.device, tp=None,
               load_format: str = "auto", max_position: int | None = None):
    model = build_model(config, dtype, device, tp, max_position)
    if load_format == "dummy":  # random weights, for benchmarks: throughput does not depend on the values
        std = getattr(config, "initializer_range", 0.02)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, std)
        return model
    loaded = model.load_weights(iter_safetensors(model_dir))
    missing = set(model.hf_weight_shapes()) - loaded - {"lm_head.weight"}
    if not model.tie_word_embeddings and "lm_head.weight" not in loaded:
        missing.add("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint in {model_dir} lacks {len(missing)} weights, e.g. {sorted(missing)[:3]}")
    return model
