"""Triton kernels for attention over the paged KV cache (same contract as ``reference.py``).

Layout (see ``metadata.py``): ``k_cache``/``v_cache`` are ``[num_blocks, block_size, KVH, D]``; token ``i`` of a
sequence lives in block ``block_table[i // block_size]`` at offset ``i % block_size``.

Design
------
* ``store_kv``: one program per new token writes its ``[KVH, D]`` rows of K and V; slot ``-1`` (CUDA-graph
  padding) is masked out.
* Every attention kernel walks the context in KV tiles of ``BLOCK_N`` tokens. The block id is gathered per
  token (``block_table[n // block_size]``), so a tile may span several cache blocks (``BLOCK_N > block_size``)
  or a part of one (``BLOCK_N < block_size``); each token row is ``D`` contiguous elements (16-byte loads).
  ``_attend_tile`` does one flash-attention step on a tile: ``S = Q K^T`` with ``tl.dot`` (fp32 inputs use
  ``input_precision="ieee"``), online softmax in the log2 domain (``exp2``, scale folded with ``log2(e)``),
  fp32 running max ``m``, sum ``l`` and accumulator ``acc``. Loops are split into full tiles, which need no
  masks, and a masked tail/diagonal part.
* Decode (``decode_attention``): grid ``(B, KVH, num_splits)``. One program holds all ``G = H / KVH`` query
  heads of its KV head as the rows of a ``[BLOCK_G, D]`` tile (``BLOCK_G = max(16, next_pow2(G))``, padded
  rows are zero and never stored), so each K/V tile is loaded once for the whole group and both products are
  tensor-core ``tl.dot``\\ s. Flash-decoding: the context is cut into ``num_splits`` ranges computed *inside*
  the kernel from ``seq_lens`` (split ``s`` gets ``[s * chunk, (s + 1) * chunk)`` with ``chunk`` a multiple of
  ``BLOCK_N``); each split writes a partial ``(m, l, acc)`` (an empty range writes ``(-inf, 0, 0)``) and
  ``_decode_reduce_kernel`` merges them. ``num_splits`` is picked on the host from ``B``, ``KVH`` and the SM
  count only, so the grid and scratch shapes depend on static shapes alone (CUDA-graph safe, no syncs).
  With one split the kernel normalizes and writes the output directly. ``seq_len == 0`` rows give zeros.
  The launch config follows the program count (``_decode_config``): a large 16-bit batch runs one-warp programs
  of 32-key tiles, 9 of which fit an SM (rl-7b's whole grid at once); smaller batches, 4 warps.
* Decode by TMA (``_decode_tma_kernel``, Hopper and later): where the one-warp config would run with one split
  (with or without shared prefixes: then over each row's own keys, as the gather kernel), with a 16-bit cache of
  q's dtype, block size 16 and a power-of-two head dim of 16-128 (``_tma_decode_ok``), each softmax step takes one
  cache block of the KV head, ``[block_size, D]``, as one box of a tensor descriptor on the cache: the Tensor Memory
  Accelerator copies it to shared memory (one thread issues it; at D = 128 in bf16 the 128-byte swizzle cuts a box
  into two copies). The block ids are read one step ahead, so the copies wait on no load of their own iteration and
  the pipeliner keeps two blocks in flight; the gather kernel's addresses hang on ids loaded in the same iteration,
  which keeps it at one tile. Decode attention alone is 4-8% faster at the RL shapes (one H200; end to end, one
  round each, rl-7b +1.1% and rl-small +2.2%, within run-to-run spread; BENCHMARKS, eighteenth session).
* Shared prefixes (the samples of one prompt): a group of consecutive decode rows whose block tables start with
  the same blocks (``metadata.plan_shared_prefixes``) reads those keys once. ``_shared_prefix_kernel`` (grid
  ``(B, KVH, choose_prefix_splits)``, only the groups' leader rows work) puts all the group's query heads of a KV
  head -- up to ``SHARED_PREFIX_ROWS`` rows, a prefill-sized tile -- against the shared keys and writes each (row,
  head) a partial ``(m, l, acc)``; the decode kernel starts from it (merging the partials of several ranges) and
  reads only the row's own keys ``[prefix, seq_len)``. Only launches of one split take the pass
  (``decode_attention`` says why). The pass cuts each prefix into ranges, one program each, by the batch
  (``choose_prefix_splits``): alone over a 2,048-token prefix at 256 rows it took 65 us a layer serial, 48 in two
  ranges. It pays for long prompts only: at a short prompt the samples' re-reads cost little, consistent with their
  hitting the L2 (``EngineConfig.shared_prefix_min_tokens``; BENCHMARKS, seventeenth and nineteenth sessions).
* Prefill (``prefill_attention``): grid ``(cdiv(max_query_len, BLOCK_M), num_seqs, H)``; a program takes
  ``BLOCK_M`` queries of one head. The queries are the last ``q_len`` positions of the ``seq_len``-token
  context (``prefix = seq_len - q_len`` cached tokens), query ``p`` sees keys ``0..p``. Tiles entirely
  below the tile's first query position run unmasked; the rest (up to the last query) apply the causal mask.
* ``paged_attention`` dispatches the decode rows and the prefill chunks of an ``AttentionMetadata`` batch.

Head dims that are not powers of two (80, 96, ...) are padded to ``BLOCK_D`` and masked.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from rlserve.attention.metadata import AttentionMetadata, SharedPrefixes

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32  # cap of choose_num_splits (an explicit num_splits may exceed it)
# From this many decode programs per SM, 16-bit caches take one-warp programs (_decode_config says when else).
_ONE_WARP_MIN_PROGRAMS_PER_SM = 4
# Decode by TMA (_decode_tma_kernel) from this CUDA compute capability (major) on: Hopper's TMA engine.
_TMA_MIN_CAPABILITY = 9
_TMA_STAGES = 3  # two blocks in flight (the third stage's buffer is the one being computed)
# Query rows of one shared-prefix program: a group of decode rows sharing a prefix has at most this many
# (members x query heads per KV head); the runner sizes groups from it (AttentionBackend.shared_prefix_rows).
SHARED_PREFIX_ROWS = 64
# Programs per group and KV head in the shared-prefix pass, each over a range of the prefix: None, by the batch
# (choose_prefix_splits); an int overrides it (1: the pass serial along the prefix, the seventeenth session's).
SHARED_PREFIX_SPLITS: int | None = None
_MAX_PREFIX_SPLITS = 8


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_kcs, stride_kch, stride_vcs, stride_vch,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # flat slot = block * block_size + offset; -1 = padding
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM) & (slot >= 0)  # [BLOCK_H, BLOCK_D]
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    # The cache is viewed as [num_blocks * block_size, KVH, D], so the slot is the row index.
    tl.store(k_cache + slot * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :],
             k.to(k_cache.dtype.element_ty), mask=mask)
    tl.store(v_cache + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :],
             v.to(v_cache.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, start_n, kv_end, qk_scale,
                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over keys [start_n, start_n + BLOCK_N) of one sequence and KV head.

    q: [R, BLOCK_D]; acc: [R, BLOCK_D] fp32; m_i, l_i: [R] fp32 (log2 domain); q_pos: [R] absolute query
    positions (used when MASKED: key n is visible iff n <= q_pos and n < kv_end).
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N] token index in the sequence
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    n_ok = offs_n < kv_end
    d_ok = offs_d[None, :] < HEAD_DIM  # [1, BLOCK_D]
    if MASKED:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)  # [BLOCK_N]
        kv_mask = n_ok[:, None] & d_ok  # [BLOCK_N, BLOCK_D]
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_ok
    in_blk = offs_n % BLOCK_SIZE
    k_row = blk * stride_kb + in_blk * stride_ks + kv_head * stride_kh  # [BLOCK_N]
    v_row = blk * stride_vb + in_blk * stride_vs + kv_head * stride_vh
    k = tl.load(k_cache + k_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(v_cache + v_row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]

    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * qk_scale  # [R, BLOCK_N]
    if MASKED:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [R]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [R, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, start, end, qk_scale,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """``_attend_tile`` over keys [start, end): whole tiles without masks, then at most one masked partial tile."""
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N
    for n in range(start, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, n, end, qk_scale,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PREC)
    for n in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, n, end, qk_scale,
                                     stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                     BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PREC)
    return acc, m_i, l_i


@triton.jit
def _shared_prefix_kernel(q_ptr, k_cache, v_cache, bt_ptr, prefix_ptr, members_ptr, pre_m, pre_l, pre_acc,
                          qk_scale, batch,
                          stride_qb, stride_qh, stride_bt,
                          stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                          NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, PREFIX_SPLITS: tl.constexpr, DOT_PREC: tl.constexpr):
    """The shared-prefix pass of decode: a group's leader row ``lead`` (``members[lead] > 0``) attends its
    ``members`` rows' queries -- ``members * GROUP`` rows of one tile, all heads of the KV head -- to the
    ``prefix[lead]`` keys their block tables share, read once through the leader's table; each (row, head) gets a
    partial ``(m, l, acc)`` that the decode kernel starts from. Other programs return at once. No row past the
    batch is read or written, whatever ``members`` says; a plan that does not match the tables (a stale one) gives
    wrong rows, nothing worse. With ``PREFIX_SPLITS`` > 1 the prefix is cut into that many ranges of whole tiles,
    one program each (grid axis 2), each writing its own partial (an empty range ``(-inf, 0, 0)``)."""
    lead = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Rows past the batch: cut here; members past the tile's BLOCK_R rows: never in offs_r below.
    members = tl.minimum(tl.load(members_ptr + lead), batch - lead)
    if members > 0:
        prefix = tl.load(prefix_ptr + lead)
        offs_r = tl.arange(0, BLOCK_R)  # [BLOCK_R] row of the tile = member * GROUP + head in the group
        offs_d = tl.arange(0, BLOCK_D)
        seq = lead.to(tl.int64) + offs_r // GROUP  # [BLOCK_R] batch row of each tile row
        heads = kv_head * GROUP + offs_r % GROUP
        r_ok = offs_r < members * GROUP
        rd_ok = r_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_ptr + seq[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=rd_ok, other=0.0)  # [BLOCK_R, BLOCK_D]
        q_pos = tl.zeros([BLOCK_R], dtype=tl.int32) + (prefix - 1)  # every shared key is visible
        bt_row = bt_ptr + lead.to(tl.int64) * stride_bt

        # This program's keys [start, end): whole tiles, possibly none.
        chunk = tl.cdiv(tl.cdiv(prefix, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
        start = split * chunk
        end = tl.minimum(start + chunk, prefix)

        m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, start, end,
                                      qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                      BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PREC)
        row = (seq * NUM_HEADS + heads) * PREFIX_SPLITS + split  # [BLOCK_R]; partials [B, H, S(, HEAD_DIM)] fp32
        tl.store(pre_m + row, m_i, mask=r_ok)
        tl.store(pre_l + row, l_i, mask=r_ok)
        tl.store(pre_acc + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=rd_ok)


@triton.jit
def _prefix_partials(pre_m, pre_l, pre_acc, b64, heads, has, offs_d, d_ok,
                     NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PREFIX_SPLITS: tl.constexpr):
    """Row ``b64``'s running ``(acc, m, l)`` after its shared prefix: the shared-prefix pass's ``PREFIX_SPLITS``
    partials of its ``heads`` merged (rows where ``has`` is false start empty: ``(0, -inf, 0)``)."""
    pre = (b64 * NUM_HEADS + heads) * PREFIX_SPLITS  # [G]; partials [B, H, S(, HEAD_DIM)] fp32
    pre_mask = has[:, None] & d_ok[None, :]
    m_i = tl.load(pre_m + pre, mask=has, other=float("-inf"))
    l_i = tl.load(pre_l + pre, mask=has, other=0.0)
    acc = tl.load(pre_acc + pre[:, None] * HEAD_DIM + offs_d[None, :], mask=pre_mask, other=0.0)
    for s in tl.static_range(1, PREFIX_SPLITS):  # merge the pass's other ranges' partials
        m_s = tl.load(pre_m + pre + s, mask=has, other=float("-inf"))
        m_new = tl.maximum(m_i, m_s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: weights 0, not NaN
        alpha = tl.exp2(m_i - m_ref)
        beta = tl.exp2(m_s - m_ref)
        l_i = l_i * alpha + tl.load(pre_l + pre + s, mask=has, other=0.0) * beta
        acc = acc * alpha[:, None] + tl.load(pre_acc + (pre + s)[:, None] * HEAD_DIM + offs_d[None, :],
                                             mask=pre_mask, other=0.0) * beta[:, None]
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_kernel(q_ptr, k_cache, v_cache, bt_ptr, seq_lens_ptr, out_ptr, part_m, part_l, part_acc,
                   prefix_ptr, pre_m, pre_l, pre_acc, qk_scale, num_splits,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
                   stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DIRECT: tl.constexpr, SHARED: tl.constexpr, PREFIX_SPLITS: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # SHARED: keys [0, lo) were attended by the shared-prefix pass; this row's own keys start at lo.
    if SHARED:
        lo = tl.minimum(tl.load(prefix_ptr + b), seq_len)
    else:
        lo = seq_len * 0  # a zero of seq_len's type: both branches give lo the same type
    # This split's key range [start, end); a multiple of BLOCK_N long, possibly empty.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)  # [BLOCK_G] query head within the group (padded)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G]
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (seq_len - 1)
    bt_row = bt_ptr + b64 * stride_bt

    if SHARED:  # (one split) a row in a group starts from the shared-prefix pass's partial(s)
        acc, m_i, l_i = _prefix_partials(pre_m, pre_l, pre_acc, b64, heads, g_ok & (lo > 0), offs_d, d_ok,
                                         NUM_HEADS, HEAD_DIM, PREFIX_SPLITS)
    else:
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, start, end, qk_scale,
                                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                                  BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, DOT_PREC)

    if DIRECT:
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        # Partials: part_m, part_l [B, H, S]; part_acc [B, H, S, HEAD_DIM], all fp32.
        row = (b64 * NUM_HEADS + heads) * num_splits + split  # [BLOCK_G]
        tl.store(part_m + row, m_i, mask=g_ok)
        tl.store(part_l + row, l_i, mask=g_ok)
        tl.store(part_acc + row[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _tma_block_step(acc, m_i, l_i, q, k_desc, v_desc, blk, kv_head, n, lo, seq_len, qk_scale,
                    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step over cache block ``blk``, keys [n, n + BLOCK_SIZE): its K and V boxes are TMA copies.
    MASKED: only keys in [lo, seq_len) count (at least one must), the others' V rows are zeroed (stale cache bytes
    may be NaN)."""
    k = k_desc.load([blk, 0, kv_head, 0]).reshape(BLOCK_SIZE, HEAD_DIM)  # [BLOCK_SIZE, D]
    v = v_desc.load([blk, 0, kv_head, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_SIZE]
    if MASKED:
        pos = n + tl.arange(0, BLOCK_SIZE)
        n_ok = (pos >= lo) & (pos < seq_len)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        v = tl.where(n_ok[:, None], v, 0.0)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _decode_tma_kernel(q_ptr, k_desc, v_desc, bt_ptr, seq_lens_ptr, out_ptr, prefix_ptr, pre_m, pre_l, pre_acc,
                       qk_scale, stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
                       NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, SHARED: tl.constexpr,
                       PREFIX_SPLITS: tl.constexpr):
    """Decode of one sequence and KV head, one split, direct output, a cache block a step by TMA (module doc).
    ``k_desc``/``v_desc``: descriptors on the [N, BS, KVH, D] caches with a [1, BS, 1, D] box. SHARED: as in
    ``_decode_kernel``, the row starts from the shared-prefix pass's partials and reads its keys from its prefix on
    (``plan_shared_prefixes``' prefixes are whole blocks; one that is not starts with a masked step over the rest of
    its last block)."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + offs_g  # [BLOCK_G]
    g_ok = offs_g < GROUP
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_ok[:, None],
                other=0.0)  # [BLOCK_G, D]
    bt_row = bt_ptr + b64 * stride_bt
    if SHARED:
        lo = tl.minimum(tl.load(prefix_ptr + b), seq_len)
        acc, m_i, l_i = _prefix_partials(pre_m, pre_l, pre_acc, b64, heads, g_ok & (lo > 0), offs_d,
                                         offs_d < HEAD_DIM, NUM_HEADS, HEAD_DIM, PREFIX_SPLITS)
    else:
        lo = seq_len * 0  # a zero of seq_len's type: both branches give lo the same type
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    full_end = seq_len // BLOCK_SIZE * BLOCK_SIZE
    start = tl.cdiv(lo, BLOCK_SIZE) * BLOCK_SIZE  # lo itself where it is whole blocks (every plan's prefix is)
    if lo < start and lo < seq_len:  # a prefix that ends inside a block: that block's keys from lo on, masked
        head = tl.load(bt_row + lo // BLOCK_SIZE)
        acc, m_i, l_i = _tma_block_step(acc, m_i, l_i, q, k_desc, v_desc, head, kv_head, start - BLOCK_SIZE, lo,
                                        seq_len, qk_scale, BLOCK_SIZE, HEAD_DIM, True)
    # Block ids one step ahead (loop-carried): a step's copies then depend on no load of their own iteration, and
    # the pipeliner issues them stages early. Past the row's blocks an id reads as 0 and is never used.
    first = start // BLOCK_SIZE
    blk = tl.load(bt_row + first, mask=first < num_blocks, other=0)
    for n in range(start, full_end, BLOCK_SIZE):
        j = n // BLOCK_SIZE + 1
        nxt = tl.load(bt_row + j, mask=j < num_blocks, other=0)
        acc, m_i, l_i = _tma_block_step(acc, m_i, l_i, q, k_desc, v_desc, blk, kv_head, n, lo, seq_len, qk_scale,
                                        BLOCK_SIZE, HEAD_DIM, False)
        blk = nxt
    if start <= full_end and full_end < seq_len:  # the last, partial block (not the head block again)
        acc, m_i, l_i = _tma_block_step(acc, m_i, l_i, q, k_desc, v_desc, blk, kv_head, full_end, lo, seq_len,
                                        qk_scale, BLOCK_SIZE, HEAD_DIM, True)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


@triton.jit
def _decode_reduce_kernel(part_m, part_l, part_acc, out_ptr, num_splits, stride_ob, stride_oh,
                          NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    row = (b * NUM_HEADS + h) * num_splits + offs_s  # [BLOCK_S]
    m = tl.load(part_m + row, mask=s_ok, other=float("-inf"))  # [BLOCK_S]
    l = tl.load(part_l + row, mask=s_ok, other=0.0)
    acc = tl.load(part_acc + row[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty (seq_len 0)
    w = tl.exp2(m - m_max)  # [BLOCK_S]; empty splits (m = -inf) weigh 0
    denom = tl.sum(w * l, 0)
    o = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)  # [BLOCK_D]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _prefill_kernel(q_ptr, k_cache, v_cache, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr, qk_scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    m_tile = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    prefix = seq_len - q_len  # cached tokens before this chunk
    kv_head = h // GROUP

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index within the chunk
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    io_mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)  # [BLOCK_M, BLOCK_D]
    tok = (q_start + offs_m).to(tl.int64)  # [BLOCK_M] row in the flat batch
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    q_pos = prefix + offs_m  # [BLOCK_M] absolute positions
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    first_pos = prefix + m_tile * BLOCK_M
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below this are visible to every row of the tile
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_M)  # one past the last visible key

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, n, kv_end,
                                     qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                     stride_vh, BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, False, DOT_PREC)
    for n in range(full_end, kv_end, BLOCK_N):  # diagonal tiles
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, bt_row, kv_head, n, kv_end,
                                     qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                                     stride_vh, BLOCK_SIZE, HEAD_DIM, BLOCK_N, BLOCK_D, True, DOT_PREC)

    o = acc / l_i[:, None]  # every valid row saw key 0, so l_i > 0
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


# ---------------------------------------------------------------------------------------------- host side

def _check_last_dim(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError("the head_dim axis must be contiguous (stride 1)")


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _decode_config(block_d: int, block_g: int, dtype: torch.dtype, programs: int, sms: int) -> dict:
    """KV tile and launch options for decode, from the launch's program count (B x KVH x splits) and the SMs.

    A large 16-bit batch (``_ONE_WARP_MIN_PROGRAMS_PER_SM`` programs per SM and more) at head dim <= 128 and
    query groups of <= 16 heads takes one-warp programs of 32-key tiles: 215 registers and 20 KB of shared memory
    each (no spills; a group of 32 spills), so 9 fit an SM, and rl-7b's 1,024 programs (256 sequences x 4 KV heads)
    are all resident at once, each streaming its own tiles with no reduction across warps; 4-warp programs fit 4
    an SM and take two rounds. Decode attention alone on one H200 (BENCHMARKS, fourteenth session): 93.1 us
    against 108.1-109.0 for 64-key tiles of 4 warps (the earlier default) and 107.3 for the best 4-warp-era config
    (64 keys, 2 warps) at the rl-7b shape, context 786; 91.9 against 108.1 / 106.6 at rl-medium's; 36.3 against
    45.7 / 37.2 at rl-small's; 70.7 against 92.7 at 160 sequences (640 programs). At 512 programs both configs
    took 61-62 us, hence the threshold. Fewer programs would leave SMs with too few warps: smaller batches keep 4
    warps (and split the context, ``choose_num_splits``). fp32 tiles are halved to stay clear of register spills."""
    if (dtype != torch.float32 and block_d <= 128 and block_g <= 16
            and programs >= _ONE_WARP_MIN_PROGRAMS_PER_SM * sms):
        return dict(BLOCK_N=32, num_warps=1, num_stages=2)
    block_n = 64 if block_d <= 128 else 32
    return dict(BLOCK_N=block_n // 2 if dtype == torch.float32 else block_n, num_warps=4, num_stages=3)


def _shared_prefix_config(block_d: int, dtype: torch.dtype) -> dict:
    """A shared-prefix program holds up to SHARED_PREFIX_ROWS query rows: a prefill-sized tile."""
    if dtype == torch.float32:
        return dict(BLOCK_N=32 if block_d <= 64 else 16, num_warps=4, num_stages=2)
    return dict(BLOCK_N=64 if block_d <= 128 else 32, num_warps=4, num_stages=3 if block_d <= 128 else 2)


def _prefill_config(block_d: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:  # correctness reference path; small tiles avoid spills
        return dict(BLOCK_M=32, BLOCK_N=32 if block_d <= 64 else 16, num_warps=8, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The CUDA device's streaming multiprocessors (cached): what static launch grids are sized from."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _sms(device: torch.device) -> int:
    return sm_count(device) if device.type == "cuda" else 8  # Triton interpreter: keep splitting exercised


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _tma_decode_ok(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether ``_decode_tma_kernel`` can run these tensors: NVIDIA Hopper or later (CPU tensors: Triton's
    interpreter); a 16-bit cache of q's dtype; block size 16, the measured one (a box is one block of one KV head);
    a power-of-two head dim of 16-128 (the one-warp config also takes 80 and 96: those stay on the gather kernel);
    a non-empty cache with the descriptor's alignment (16-byte base and strides)."""
    head_dim, block_size = k_cache.shape[3], k_cache.shape[1]
    if q.device.type == "cuda":
        if torch.version.hip is not None:  # ROCm reports MI300 as 9.4: no TMA there
            return False
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        if _capability(index)[0] < _TMA_MIN_CAPABILITY:
            return False
    elif q.device.type != "cpu":
        return False
    return (q.dtype in (torch.float16, torch.bfloat16) and k_cache.dtype == v_cache.dtype == q.dtype
            and block_size == 16 and 16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0
            and k_cache.numel() > 0
            and all(t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])
                    for t in (k_cache, v_cache)))


def _cache_descriptor(cache: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor on a [N, BS, KVH, D] cache whose box is one block of one KV head, [1, BS, 1, D]. Its base
    address is encoded at launch and, under CUDA graphs, baked into the graph, as the gather kernel's pointers are:
    the caches live as long as the graphs (``ModelRunner``)."""
    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), [1, cache.shape[1], 1, cache.shape[3]])


def shared_prefix_min_batch(num_kv_heads: int, device: torch.device) -> int:
    """The fewest decode rows whose launch takes the shared-prefix pass: those of one split (``decode_attention``)."""
    return triton.cdiv(_sms(device), num_kv_heads)


def choose_prefix_splits(batch: int, num_kv_heads: int, group: int, device: torch.device) -> int:
    """Programs per group and KV head in the shared-prefix pass, from static quantities only (CUDA graphs): a
    power of two (few compiled variants) of at most 8 that brings the pass to about 2 programs per SM, counting the
    fewest groups ``batch`` rows can form (full tiles: ``SHARED_PREFIX_ROWS // group`` rows each). At 256 rows of
    the 7B shape that is 2, at 128 rows 4, at 64 rows 8: the fastest of 1, 2, 4 and 8 at each in
    ``shared_prefix_probe.py`` (one H200, under CUDA graphs; BENCHMARKS, nineteenth session). With more, smaller
    groups (fewer samples a prompt) the pass has more programs than that and the ranges only shorten them.
    ``SHARED_PREFIX_SPLITS``, when set, overrides the rule."""
    if SHARED_PREFIX_SPLITS is not None:
        if SHARED_PREFIX_SPLITS < 1:
            raise ValueError(f"SHARED_PREFIX_SPLITS must be >= 1 (or None: by the batch), got {SHARED_PREFIX_SPLITS}")
        return SHARED_PREFIX_SPLITS
    groups = triton.cdiv(batch, max(1, SHARED_PREFIX_ROWS // group))
    fit = max(1, 2 * _sms(device) // (groups * num_kv_heads))
    return min(_MAX_PREFIX_SPLITS, 1 << (fit.bit_length() - 1))


def choose_num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """KV splits for decode from static quantities only (no seq_lens): aim for ~2 programs per SM.

    Measured on H200 (B=4, 8 KV heads, L=8192): 9 splits reach ~2.4 TB/s; doubling them is slower."""
    sms = _sms(device)
    programs = batch * num_kv_heads
    if programs >= sms:
        return 1
    return min(_MAX_SPLITS, triton.cdiv(2 * sms, programs))


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, KVH, D]; caches: [N, BS, KVH, D]; slot_mapping: [T] int64, -1 = skip."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_last_dim(k, v, k_cache, v_cache)
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1), "cache blocks must be dense"
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1), "cache blocks must be dense"
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     out: torch.Tensor | None = None, num_splits: int | None = None,
                     shared_prefixes: SharedPrefixes | None = None,
                     prefix_splits: int | None = None) -> torch.Tensor:
    """q: [B, H, D]; block_tables: [B, max_blocks] int32; seq_lens: [B] int32 -> out [B, H, D].

    One query per sequence (position seq_len - 1, its K/V already stored); seq_len 0 rows give zeros.
    ``num_splits`` (default: ``choose_num_splits``) must not depend on seq_lens values for CUDA graphs;
    with more than one split, fp32 partials ``[B, H, num_splits(, D)]`` are allocated per call.

    ``shared_prefixes`` (``metadata.plan_shared_prefixes``, [B] each): groups of rows that share their first blocks
    read those keys once a group -- ``_shared_prefix_kernel`` first, then each row's own keys from there -- where
    the launch has one split (``B * KVH`` programs fill the SMs): a small batch, whose context is split across
    programs, reads every row's whole context as without the plan (the pass's time does not shrink with the batch,
    and its ranges are at most ``_MAX_PREFIX_SPLITS``). A group has at most ``SHARED_PREFIX_ROWS // (H / KVH)``
    rows. ``prefix_splits`` (default ``choose_prefix_splits``): programs per group and KV head in the pass, each
    over a range of the prefix, their partials merged by the decode kernel.

    Where the one-warp config runs with one split, ``_tma_decode_ok`` tensors take ``_decode_tma_kernel`` (module
    doc), with or without a plan."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    _check_last_dim(q, out, k_cache, v_cache)
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, q.device)
    block_d = triton.next_power_of_2(head_dim)
    block_g = max(16, triton.next_power_of_2(group))
    direct = num_splits == 1
    if direct:
        part_m = part_l = part_acc = out  # unused
    else:
        part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
    shared = shared_prefixes is not None and direct
    if shared:
        prefix_lens = shared_prefixes.lens
        splits = choose_prefix_splits(batch, num_kv_heads, group, q.device) if prefix_splits is None \
            else prefix_splits
        if splits < 1:  # no pass would run, and the decode kernel would merge unwritten scratch
            raise ValueError(f"prefix_splits must be >= 1, got {splits}")
        pre_m = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
        pre_l = torch.empty_like(pre_m)
        pre_acc = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        _shared_prefix_kernel[(batch, num_kv_heads, splits)](
            q, k_cache, v_cache, block_tables, prefix_lens, shared_prefixes.group_sizes, pre_m, pre_l, pre_acc,
            scale * _LOG2E, batch, q.stride(0), q.stride(1), block_tables.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            NUM_HEADS=num_heads, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_R=SHARED_PREFIX_ROWS,
            BLOCK_D=block_d, PREFIX_SPLITS=splits, DOT_PREC=_dot_precision(q.dtype),
            **_shared_prefix_config(block_d, q.dtype))
    else:  # the kernel takes pointers it does not read (SHARED=False): any tensor will do
        prefix_lens = pre_m = pre_l = pre_acc = seq_lens
        splits = 1
    config = _decode_config(block_d, block_g, q.dtype, batch * num_kv_heads * num_splits, _sms(q.device))
    if direct and config["num_warps"] == 1 and _tma_decode_ok(q, k_cache, v_cache):
        _decode_tma_kernel[(batch, num_kv_heads)](
            q, _cache_descriptor(k_cache), _cache_descriptor(v_cache), block_tables, seq_lens, out,
            prefix_lens, pre_m, pre_l, pre_acc, scale * _LOG2E,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
            NUM_HEADS=num_heads, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_G=block_g,
            SHARED=shared, PREFIX_SPLITS=splits, num_warps=1, num_stages=_TMA_STAGES)
        return out
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_m, part_l, part_acc,
        prefix_lens, pre_m, pre_l, pre_acc, scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_G=block_g, BLOCK_D=block_d, DIRECT=direct, SHARED=shared, PREFIX_SPLITS=splits,
        DOT_PREC=_dot_precision(q.dtype), **config)
    if not direct:
        _decode_reduce_kernel[(batch, num_heads)](
            part_m, part_l, part_acc, out, num_splits, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d, num_warps=4 if block_d >= 128 else 2)
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      max_query_len: int, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, H, D]; query_start_loc: [P+1] int32 (row offsets into q); seq_lens: [P] int32;
    block_tables: [P, max_blocks] int32 -> out [T, H, D] (rows outside the P sequences are not written)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads
    if out is None:
        out = torch.empty_like(q)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    _check_last_dim(q, out, k_cache, v_cache)
    block_d = triton.next_power_of_2(head_dim)
    cfg = _prefill_config(block_d, q.dtype)
    grid = (triton.cdiv(max_query_len, cfg["BLOCK_M"]), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        GROUP=group, BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d,
        DOT_PREC=_dot_precision(q.dtype), **cfg)
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, D] -> [T, H, D], like ``reference.paged_attention``. New K/V must already be stored."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        shared = meta.shared_prefixes
        decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                         out=out[:nd], shared_prefixes=None if shared is None else shared.rows(nd))
    if meta.num_prefills:
        # query_start_loc[nd:] holds absolute row offsets into q, so q and out are passed whole.
        max_q = max(meta.query_lens_cpu[nd:], default=meta.max_query_len)
        prefill_attention(q, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:],
                          meta.seq_lens[nd:], max_q, scale, out=out)
    return out
