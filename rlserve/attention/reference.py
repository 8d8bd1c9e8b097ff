"""Plain-PyTorch attention over the paged KV cache.

Runs on any device. It is the backend on CPU and the oracle the Triton kernels are tested against. Decodes
are batched into one ``scaled_dot_product_attention`` call over their gathered, padded contexts; each
prefill chunk is one call with a causal mask offset by its cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlserve.attention.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values.  k, v: [T, KVH, D]; caches: [N, BS, KVH, D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` tokens of one sequence: [length, KVH, D]."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks])  # [nb, BS, KVH, D]
    return blocks.flatten(0, 1)[:length]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D]. The new tokens' K/V must already be in the cache."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = _decode(q[:nd], k_cache, v_cache, meta, scale)
    start = nd
    for i in range(nd, meta.num_seqs):
        q_len, seq_len = meta.query_lens_cpu[i], meta.seq_lens_cpu[i]
        k = gather_context(k_cache, meta.block_tables[i], seq_len)
        v = gather_context(v_cache, meta.block_tables[i], seq_len)
        out[start:start + q_len] = _causal_chunk(q[start:start + q_len], k, v, scale)
        start += q_len
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float) -> torch.Tensor:
    """One query per sequence, contexts padded to the longest: q [B, H, D] -> [B, H, D]."""
    nd = q.shape[0]
    max_len = max(meta.seq_lens_cpu[:nd])
    block_size = k_cache.shape[1]
    num_blocks = (max_len + block_size - 1) // block_size
    table = meta.block_tables[:nd, :num_blocks].long()
    flat = table.flatten()
    k = k_cache.index_select(0, flat).view(nd, num_blocks * block_size, *k_cache.shape[2:])[:, :max_len]
    v = v_cache.index_select(0, flat).view(nd, num_blocks * block_size, *v_cache.shape[2:])[:, :max_len]
    # k, v: [B, L, KVH, D]
    positions = torch.arange(max_len, device=q.device)
    # Contexts of one length need no mask (and then take the same kernel as an unpadded decode).
    mask = None
    if min(meta.seq_lens_cpu[:nd]) != max_len:
        mask = (positions[None, :] < meta.seq_lens[:nd, None])[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2), v.transpose(1, 2),  # [B, KVH, L, D]
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[2])
    return o.squeeze(2)


def _causal_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The last q_len tokens of a sequence attend causally to its whole context.

    q: [Q, H, D]; k, v: [L, KVH, D] with L >= Q -> [Q, H, D].
    """
    q_len, ctx_len = q.shape[0], k.shape[0]
    gqa = q.shape[1] != k.shape[1]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if q_len == ctx_len:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        key_pos = torch.arange(ctx_len, device=q.device)
        query_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [Q, L]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return o.transpose(0, 1)
