"""HTTP request and response bodies of TRL's protocol and rlserve's own endpoints (shared with the client).

Field names and defaults are those of ``trl vllm-serve``. Unknown top-level fields are ignored, as TRL's
server did; ``generation_kwargs`` keys are checked strictly (they become SamplingParams fields).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    n: int = 1
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    max_tokens: int | None = 16
    logprobs: int | None = 0
    structured_outputs_regex: str | None = None
    guided_decoding_regex: str | None = None  # the name older TRL releases used
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)  # older TRL releases: keep the last N
    generation_kwargs: dict[str, Any] = Field(default_factory=dict)

    def sampling_dict(self) -> dict[str, Any]:
        """The SamplingParams fields this request asks for; ``generation_kwargs`` override the others."""
        values = {k: getattr(self, k) for k in ("n", "repetition_penalty", "temperature", "top_p", "top_k",
                                                "min_p", "max_tokens", "logprobs")}
        regex = self.structured_outputs_regex or self.guided_decoding_regex
        if regex is not None:
            values["structured_outputs"] = {"regex": regex}
        kwargs = dict(self.generation_kwargs)
        if "structured_outputs" in kwargs and isinstance(kwargs["structured_outputs"], dict):
            values["structured_outputs"] = kwargs.pop("structured_outputs")
        values.update(kwargs)
        return values


class GenerateRequest(SamplingFields):
    prompts: list[str] | list[list[int]]
    # "binary": ids and logprobs as base64 numpy arrays (rlserve/server/binary.py); JSON lists by default.
    response_format: Literal["json", "binary"] = "json"


class ChatRequest(SamplingFields):
    messages: list[list[dict[str, Any]]]
    response_format: Literal["json", "binary"] = "json"  # as GenerateRequest's
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class SequenceLogprobsRequest(BaseModel):
    """TRL 1.9-1.10's teacher scoring: the logprobs of each sequence from its prompt length on."""
    model_config = ConfigDict(extra="ignore")

    sequences: list[list[int]]  # prompt + completion token ids
    prompt_lengths: list[int]
    top_logprobs: int = 100
    temperature: float = 1.0
    response_format: Literal["json", "binary"] = "json"  # "binary": base64 numpy arrays


class InitCommunicatorRequest(BaseModel):
    host: str
    port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=2)
    client_device_uuid: str | None = None
    timeout_s: float = Field(default=120.0, gt=0)
    # "nccl" (GPU to GPU) or "gloo" (through host memory: a trainer on CPU, or on a GPU the server uses).
    # Default: nccl when the client names a CUDA device (TRL sends its uuid), else gloo.
    backend: Literal["nccl", "gloo"] | None = None


class WeightTransferInitInfo(BaseModel):
    """vLLM's ``NCCLWeightTransferInitInfo``: the trainer (rank 0) hosts the group's store."""
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(default=1, ge=1)  # the trainer is rank 0
    world_size: int = Field(ge=2)
    packed: bool | None = None  # vLLM >= 0.28's trainer says it here rather than per update


class InitWeightTransferRequest(BaseModel):
    init_info: WeightTransferInitInfo
    backend: Literal["nccl", "gloo"] | None = None  # rlserve's: gloo only between rlserve's own ends
    timeout_s: float = Field(default=300.0, gt=0)  # vLLM's store timeout


class VllmUpdateInfo(BaseModel):
    """vLLM's ``NCCLWeightTransferUpdateInfo``: the tensors that follow, in broadcast order."""
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    packed: bool | None = None  # None: as init_info said (vLLM >= 0.28), else per tensor
    packed_buffer_size_bytes: int = Field(default=1 << 30, gt=0)
    packed_num_buffers: int = Field(default=2, ge=1)

    @model_validator(mode="after")
    def _same_lengths(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes must have the same length, got {len(self.names)}, "
                             f"{len(self.dtype_names)} and {len(self.shapes)}")
        return self


class UpdateNamedParamRequest(BaseModel):
    name: str
    dtype: str
    shape: list[int]


class TensorEntry(BaseModel):
    name: str
    shape: list[int]
    offset: int = Field(ge=0)


class Bucket(BaseModel):
    dtype: str
    numel: int = Field(ge=0)
    tensors: list[TensorEntry]


class UpdateWeightsRequest(BaseModel):
    buckets: list[Bucket]
    version: int | None = None  # None: current + 1


class PauseRequest(BaseModel):
    mode: Literal["abort", "wait", "keep"] = "abort"


class AbortRequest(BaseModel):
    request_ids: list[str] | None = None  # None: every request


class MessageResponse(BaseModel):
    message: str
