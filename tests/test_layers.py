"""Layers on CPU: the MLP's gate and up as two GEMMs (what the fused-kernel path runs on CUDA) against one fused
GEMM, on a single rank and on a tensor-parallel rank, and the runner's switch that turns it and the attention
layers' rotary-and-store kernel on."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from rlserve.distributed.parallel import SINGLE, TensorParallel
from rlserve.layers import fused
from rlserve.layers.linear import MergedColumnParallelLinear
from rlserve.models.llama import LlamaMLP


def test_merged_linear_parts_on_a_tp_rank_are_its_rows_of_gate_and_up():
    """forward_parts on rank 1 of 2: each part is that rank's rows of the full gate / up weight and bias (the
    halves of its fused local weight), loaded through the checkpoint path."""
    torch.manual_seed(0)
    gate_w, up_w, gate_b, up_b = torch.randn(12, 8), torch.randn(12, 8), torch.randn(12), torch.randn(12)
    layer = MergedColumnParallelLinear(8, [12, 12], bias=True, tp=TensorParallel(rank=1, size=2))
    for part, (w, b) in enumerate(((gate_w, gate_b), (up_w, up_b))):
        layer.weight.weight_loader(layer.weight, w, part)
        layer.bias.weight_loader(layer.bias, b, part)
    x = torch.randn(5, 8)
    gate, up = layer.forward_parts(x)
    torch.testing.assert_close(gate, F.linear(x, gate_w[6:], gate_b[6:]))
    torch.testing.assert_close(up, F.linear(x, up_w[6:], up_b[6:]))
    torch.testing.assert_close(torch.cat([gate, up], dim=1), layer(x))


def test_the_split_mlp_equals_the_fused_one_and_the_runners_switch_sets_it(monkeypatch):
    torch.manual_seed(1)
    config = SimpleNamespace(hidden_size=16, intermediate_size=40, hidden_act="silu", mlp_bias=True)
    mlp = LlamaMLP(config, SINGLE)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(9, 16)
    want = mlp(x)
    assert mlp.split_gate_up is False  # the model's own default: one GEMM
    mlp.split_gate_up = True
    torch.testing.assert_close(mlp(x), want, atol=1e-6, rtol=1e-6)
    monkeypatch.setattr(fused, "SPLIT_GATE_UP_MIN_WEIGHTS", 40 * 16)  # this gate's size: split
    for on, split in ((False, True), (True, True), (True, False)):
        monkeypatch.setattr(fused, "SPLIT_GATE_UP", split)
        fused.use_fused_kernels(mlp, on)
        assert mlp.split_gate_up is (on and split) and mlp.act.use_fused is on
    monkeypatch.setattr(fused, "SPLIT_GATE_UP", True)
    monkeypatch.setattr(fused, "SPLIT_GATE_UP_MIN_WEIGHTS", 40 * 16 + 1)  # one entry short: one GEMM
    fused.use_fused_kernels(mlp, True)
    assert mlp.split_gate_up is False and mlp.act.use_fused is True


def test_the_runners_switch_sets_the_attention_layers_rotary_store_kernel(monkeypatch):
    """A decoder layer's attention takes the rotary-and-store kernel where the fused kernels run (with
    FUSE_ROTARY_STORE on and a backend whose store it may replace), and its rotary table the in-place kernel; on the
    CPU path neither."""
    from rlserve.models import llama
    config = SimpleNamespace(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=16, rope_theta=10000.0, rms_norm_eps=1e-6)
    attn = llama.LlamaAttention(config, SINGLE, llama.RotaryEmbedding(8, 16, llama.rope_parameters(config)))
    assert attn.attn.fuse_rotary_store is False and attn.rotary_emb.use_fused is False
    for on, fuse in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(fused, "FUSE_ROTARY_STORE", fuse)
        fused.use_fused_kernels(attn, on)
        assert attn.attn.fuse_rotary_store is (on and fuse) and attn.rotary_emb.use_fused is on
    monkeypatch.setattr(fused, "FUSE_ROTARY_STORE", True)
    fused.use_fused_kernels(attn, True, fuse_kv_store=False)  # a backend that keeps its own store (the reference)
    assert attn.attn.fuse_rotary_store is False and attn.rotary_emb.use_fused is True


def test_only_the_7b_workloads_mlp_is_split_where_it_was_measured_to_gain():
    """The size rule against the A/Bs it stands on (BENCHMARKS, fifteenth and sixteenth sessions): rl-7b's MLP
    (gate 18944 x 3584) splits (+0.6%); rl-medium's (even) and rl-small's (-5.6%) keep one GEMM."""
    from rlserve.bench.workloads import QWEN25_05B, QWEN25_7B, QWEN25_15B
    for arch, split in ((QWEN25_7B, True), (QWEN25_15B, False), (QWEN25_05B, False)):
        config = SimpleNamespace(hidden_size=arch["hidden_size"], intermediate_size=arch["intermediate_size"],
                                 hidden_act="silu", mlp_bias=False)
        with torch.device("meta"):
            mlp = LlamaMLP(config, SINGLE)
        fused.use_fused_kernels(mlp, True)
        assert mlp.split_gate_up is split, arch["intermediate_size"]
