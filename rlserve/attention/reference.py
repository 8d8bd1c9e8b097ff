"""Plain-PyTorch attention over the paged KV cache.

Runs on any device. It is the backend on CPU and the oracle the Triton kernels are tested against. Decodes
of equal context length are batched into one ``scaled_dot_product_attention`` call (no padding, so results
do not depend on the batch); each prefill chunk is one call with a causal mask offset by its cached prefix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlserve.attention.metadata import AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values.  k, v: [T, KVH, D]; caches: [N, BS, KVH, D]. A slot of -1 is not
    written (a multi-step launch's row past its last kept draw; CUDA-graph padding)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):  # (a host sync on a GPU: this backend is the CPU path and the kernels' oracle)
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
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
    """One query per sequence: q [B, H, D] -> [B, H, D]. Sequences are batched by context length, with no
    padding and no mask, so a sequence's result does not depend on the others in the step."""
    nd = q.shape[0]
    lengths = meta.seq_lens_cpu[:nd]
    if min(lengths) == max(lengths):
        return _decode_same_length(q, k_cache, v_cache, meta.block_tables[:nd], lengths[0], scale)
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    for length, rows in by_length.items():
        index = torch.tensor(rows, device=q.device)
        out[index] = _decode_same_length(q[index], k_cache, v_cache, meta.block_tables[index], length, scale)
    return out


def _decode_same_length(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                        length: int, scale: float) -> torch.Tensor:
    b = q.shape[0]
    block_size = k_cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    flat = tables[:, :num_blocks].flatten()
    k = k_cache.index_select(0, flat).view(b, num_blocks * block_size, *k_cache.shape[2:])[:, :length]
    v = v_cache.index_select(0, flat).view(b, num_blocks * block_size, *v_cache.shape[2:])[:, :length]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        k.transpose(1, 2), v.transpose(1, 2),  # [B, KVH, L, D]
        scale=scale, enable_gqa=q.shape[1] != k.shape[2])
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
