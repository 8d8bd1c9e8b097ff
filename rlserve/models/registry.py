"""Architecture name (``config.architectures[0]``) -> model class."""

from __future__ import annotations

from rlserve.models.llama import LlamaForCausalLM, MistralForCausalLM
from rlserve.models.qwen2 import Qwen2ForCausalLM
from rlserve.models.qwen3 import Qwen3ForCausalLM

MODELS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(config) -> type:
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in MODELS:
            return MODELS[arch]
    raise ValueError(f"unsupported architecture {archs or getattr(config, 'model_type', None)!r}; "
                     f"supported: {', '.join(sorted(MODELS))}")
