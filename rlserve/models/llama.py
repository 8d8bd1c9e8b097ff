"""The Llama decoder (Llama 2/3, Mistral), in plain PyTorch with fused QKV and gate-up projections.

Qwen2 and Qwen3 are the same network with q/k/v biases or q/k norms; their files subclass this one.
Module names follow Hugging Face's, except the fused projections, so checkpoint and trainer parameter names
map onto ours through ``PACKED``.

Shapes: T = tokens in the step (flat over sequences), D = hidden size, H/KVH = this rank's heads.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from rlserve.attention import AttentionMetadata
from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.layers.activation import SiluAndMul
from rlserve.layers.attention import Attention
from rlserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from rlserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from rlserve.layers.norm import RMSNorm
from rlserve.layers.rotary import RotaryEmbedding, rope_parameters

# Hugging Face projection name -> (our fused module, slot)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaAttention(nn.Module):
    qkv_bias_default = False
    qk_norm = False

    def __init__(self, config, tp: TensorParallel, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        bias = getattr(config, "attention_bias", None)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          num_kv_heads, bias=self.qkv_bias_default if bias is None else bias,
                                          tp=tp)
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=bool(getattr(config, "attention_bias", False)), tp=tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb  # one table for all layers (LlamaModel's)
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.view(-1, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn(q, k, v, meta, positions, self.rotary_emb)  # rotary, KV store, attention: [T, H, D]
        return self.o_proj(o.flatten(1))


class LlamaMLP(nn.Module):
    split_gate_up = False  # gate and up as two GEMMs: the model runner's choice (layers/fused.py)

    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias, tp=tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias, tp=tp)
        self.act = SiluAndMul()

    @property
    def gate_weights(self) -> int:
        """Entries of this rank's gate projection (what the runner's choice of split_gate_up goes by)."""
        return self.gate_up_proj.weight.numel() // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_gate_up:
            return self.down_proj(self.act.parts(*self.gate_up_proj.forward_parts(x)))
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, tp: TensorParallel, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.self_attn = self.attention_cls(config, tp, rotary_emb)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried separately, so that each add fuses with the norm after it:
        returns (this layer's MLP output, the residual stream before it is added)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm.add(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm.add(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config, tp: TensorParallel, layer_cls=LlamaDecoderLayer, max_position: int | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        # The cos/sin table, built once and shared by every layer, for the positions the engine will use
        # (max_model_len): at max_position_embeddings per layer it took ~0.9 GiB at the 7B shape.
        self.rotary_emb = RotaryEmbedding(head_dim_of(config), max_position or config.max_position_embeddings,
                                          rope_parameters(config))
        self.layers = nn.ModuleList([layer_cls(config, tp, self.rotary_emb)
                                     for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, D]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm.add(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    decoder_layer_cls = LlamaDecoderLayer

    def __init__(self, config, tp: TensorParallel = SINGLE, max_position: int | None = None):
        """``max_position``: the longest context the engine runs (max_model_len; default: the model's)."""
        super().__init__()
        self.config = config
        self.tp = tp
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.model = LlamaModel(config, tp, self.decoder_layer_cls, max_position)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, D]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, D] -> logits [N, V] in the model's dtype (the sampler upcasts what it processes)."""
        return self.lm_head(hidden)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    # -- weights -----------------------------------------------------------------------------------
    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every Hugging Face parameter name this model accepts, with its full (unsharded) shape."""
        c = self.config
        d, hd = c.hidden_size, head_dim_of(c)
        kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,),
                  "lm_head.weight": (c.vocab_size, d)}  # accepted when tied too: it is the same tensor
        attn = self.model.layers[0].self_attn
        mlp = self.model.layers[0].mlp
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes[p + "input_layernorm.weight"] = (d,)
            shapes[p + "post_attention_layernorm.weight"] = (d,)
            for name, rows in (("q", c.num_attention_heads * hd), ("k", kvh * hd), ("v", kvh * hd)):
                shapes[p + f"self_attn.{name}_proj.weight"] = (rows, d)
                if attn.qkv_proj.bias is not None:
                    shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
            shapes[p + "self_attn.o_proj.weight"] = (d, c.num_attention_heads * hd)
            if attn.o_proj.bias is not None:
                shapes[p + "self_attn.o_proj.bias"] = (d,)
            if attn.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (hd,)
                shapes[p + "self_attn.k_norm.weight"] = (hd,)
            for name in ("gate_proj", "up_proj"):
                shapes[p + f"mlp.{name}.weight"] = (c.intermediate_size, d)
                if mlp.gate_up_proj.bias is not None:
                    shapes[p + f"mlp.{name}.bias"] = (c.intermediate_size,)
            shapes[p + "mlp.down_proj.weight"] = (d, c.intermediate_size)
            if mlp.down_proj.bias is not None:
                shapes[p + "mlp.down_proj.bias"] = (d,)
        return shapes

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors (full, unsharded); returns the names loaded."""
        params = self.__dict__.get("_params_by_name")
        if params is None:  # parameters keep their identity: look them up once (weight sync calls this often)
            params = self.__dict__["_params_by_name"] = dict(self.named_parameters(remove_duplicate=False))
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                name = "model.embed_tokens.weight"
            target, shard = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in PACKED:
                fused, shard = PACKED[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            param = params.get(target)
            if param is None:
                raise KeyError(f"unknown parameter {name!r}")
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, shard)
            loaded.add(name)
        return loaded


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama's network; sliding-window configs are capped to the window by the loader."""
