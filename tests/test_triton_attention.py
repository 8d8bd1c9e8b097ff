"""Triton paged-attention kernels against the PyTorch reference (rlserve.attention.reference).

On a CUDA machine the tests are marked ``gpu`` and run the full parameter grids. With
``RLSERVE_TRITON_INTERPRET=1`` they run on CPU tensors under the Triton interpreter with a small grid:
``RLSERVE_TRITON_INTERPRET=1 python -m pytest tests/test_triton_attention.py -q``. Without triton the module
is skipped; without CUDA (and not interpreting) the tests are skipped.

Caches are poisoned: every slot that no sequence owns (including the tail of each sequence's last block and
block 0, which pads the block tables) holds NaN in the cache given to the kernels, so any read outside a
sequence's context shows up as NaN. The reference reads a NaN-free copy (its padded decode path would
otherwise propagate NaN through the masked softmax).
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from conftest import TRITON_INTERPRET as INTERPRET, KernelLaunches, triton_kernel_module

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

DEVICE, pytestmark = triton_kernel_module()

from rlserve.attention import reference  # noqa: E402
from rlserve.attention import triton_paged as tp  # noqa: E402
from rlserve.attention.metadata import AttentionMetadata, SharedPrefixes, plan_shared_prefixes  # noqa: E402

# The interpreter cannot run tl.dot on bf16 (it multiplies the raw uint16 bits), so bf16 attention is
# GPU-only; fp16 takes the same code path there.
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _params(full, small):
    return small if INTERPRET else full


# (dtype, head_dim, gqa, block_size)
ATTN_CASES = _params(
    list(itertools.product(GPU_DTYPES, [64, 128], [1, 2, 7, 8], [8, 16, 64, 256]))
    + [(torch.bfloat16, 96, 2, 16), (torch.bfloat16, 256, 4, 16), (torch.float32, 80, 7, 32)],
    [(torch.float32, 64, 1, 16), (torch.float16, 64, 7, 8), (torch.float16, 128, 2, 64),
     (torch.float32, 64, 8, 32), (torch.float16, 96, 2, 16), (torch.float16, 64, 7, 16)])
NUM_KV_HEADS = 2


def _ids(case):
    dtype, head_dim, gqa, block_size = case
    return f"{str(dtype).split('.')[-1]}-d{head_dim}-g{gqa}-bs{block_size}"


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite output (read outside the context?)"
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    else:
        err = (out - ref).abs().max().item()
        rel = ((out - ref).norm() / ref.norm().clamp_min(1e-6)).item()
        assert err < 2e-2 and rel < 1e-2, f"max abs err {err:.3g}, relative norm err {rel:.3g}"


class PagedCache:
    """Random contexts in shuffled cache blocks; ``k``/``v`` poisoned, ``k_ref``/``v_ref`` clean."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, block_size, dtype, gen, extra_blocks=3):
        per_seq = [triton.cdiv(n, block_size) for n in seq_lens]
        num_blocks = 1 + sum(per_seq) + extra_blocks  # block 0 is never allocated: it pads the tables
        order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        self.block_tables = torch.zeros(len(seq_lens), max(per_seq, default=0) + 2, dtype=torch.int32)
        for i, n in enumerate(per_seq):
            self.block_tables[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
            order = order[n:]
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.full(shape, float("nan"), dtype=dtype)
        self.v = torch.full(shape, float("nan"), dtype=dtype)
        self.k_ref, self.v_ref = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        for i, n in enumerate(seq_lens):
            slots = self.slots(i, 0, n)
            k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
            v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
            for kc, vc in ((self.k, self.v), (self.k_ref, self.v_ref)):
                reference.write_kv(k, v, kc, vc, slots)
        self.block_size = block_size
        for name in ("k", "v", "k_ref", "v_ref", "block_tables"):
            setattr(self, name, getattr(self, name).to(DEVICE))

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        bs = self.k.shape[1]
        pos = torch.arange(start, end)
        return (self.block_tables[seq].cpu().long()[pos // bs] * bs + pos % bs).to(self.k.device)


def _meta(query_lens, seq_lens, num_decodes, cache: PagedCache) -> AttentionMetadata:
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = [cache.slots(i, s - q, s) for i, (q, s) in enumerate(zip(query_lens, seq_lens))]
    return AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=cache.block_tables,
        num_decodes=num_decodes, max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens))


def _reference(q, cache: PagedCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """The oracle in fp32 on the clean cache."""
    return reference.paged_attention(q.float(), cache.k_ref.float(), cache.v_ref.float(), meta, scale)


def _queries(num_tokens, num_heads, head_dim, dtype, gen, strided=False):
    """q: [T, H, D]; with strided=True a view into a packed qkv-like buffer (row stride > H * D)."""
    if not strided:
        return torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    packed = torch.randn(num_tokens, num_heads + 2 * NUM_KV_HEADS, head_dim, generator=gen).to(dtype)
    return packed.to(DEVICE)[:, :num_heads]


# ----------------------------------------------------------------------------------------------- store_kv

@pytest.mark.parametrize("dtype", _params(GPU_DTYPES, [torch.bfloat16, torch.float32]))
@pytest.mark.parametrize("num_kv_heads,head_dim", _params([(1, 64), (2, 128), (8, 128), (3, 96)],
                                                          [(2, 64), (3, 96)]))
@pytest.mark.parametrize("block_size", _params([8, 16, 256], [8]))
def test_store_kv(dtype, num_kv_heads, head_dim, block_size):
    gen = torch.Generator().manual_seed(0)
    num_blocks, num_tokens = 6, 13
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[2, 7, num_tokens - 1]] = -1  # padding tokens
    # K/V as views into a packed qkv-like buffer: token stride > KVH * D.
    packed = torch.randn(num_tokens, 3, num_kv_heads, head_dim, generator=gen).to(dtype)
    k, v = packed[:, 1].to(DEVICE), packed[:, 2].to(DEVICE)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    k_exp, v_exp = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    reference.write_kv(k[keep.to(DEVICE)], v[keep.to(DEVICE)], k_exp, v_exp, slots[keep].to(DEVICE))

    tp.store_kv(k, v, k_cache, v_cache, slots.to(DEVICE))
    torch.testing.assert_close(k_cache, k_exp, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_exp, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------------------- decode

@pytest.fixture(params=["four-warps", "one-warp", "tma"])
def decode_path(request, monkeypatch):
    """Every decode launch at any batch: 64-key tiles of 4 warps (small batches, fp32), the one-warp programs of
    32-key tiles that large 16-bit batches take (``_decode_config``), and those programs' TMA kernel where the
    device and the tensors allow it (``_tma_decode_ok``: block size 16, power-of-two head dims; CPU tensors under
    the interpreter; on CUDA, Hopper or later). ``tp._decode_tma_kernel.count`` says how often the TMA kernel ran.
    Only ``one-warp`` turns the TMA kernel off by hand: with four warps, the dispatch's own rule must keep it off."""
    if (request.param == "tma" and DEVICE == "cuda"
            and torch.cuda.get_device_capability()[0] < tp._TMA_MIN_CAPABILITY):
        pytest.skip("the TMA decode kernel needs Hopper or later")
    monkeypatch.setattr(tp, "_ONE_WARP_MIN_PROGRAMS_PER_SM", 1 << 30 if request.param == "four-warps" else 0)
    if request.param == "one-warp":
        monkeypatch.setattr(tp, "_tma_decode_ok", lambda *_: False)
    monkeypatch.setattr(tp, "_decode_tma_kernel", KernelLaunches(tp._decode_tma_kernel))
    return request.param


def _skip_same_path(path: str, dtype: torch.dtype, head_dim: int = 64, block_size: int = 16) -> None:
    if path != "four-warps" and (dtype == torch.float32 or head_dim > 128):
        pytest.skip("fp32 and head dims over 128 have one decode launch config")
    if path == "tma" and (block_size != 16 or head_dim & (head_dim - 1)):
        pytest.skip("the TMA kernel takes block size 16 and power-of-two head dims: the one-warp case")


@pytest.mark.parametrize("case", ATTN_CASES, ids=_ids)
@pytest.mark.parametrize("num_splits", _params([None, 1, 3], [None, 3]))
def test_decode(case, num_splits, decode_path):
    dtype, head_dim, gqa, bs = case
    _skip_same_path(decode_path, dtype, head_dim, bs)
    gen = torch.Generator().manual_seed(1)
    seq_lens = [1, bs - 1 or 1, bs, bs + 1, 3 * bs + 5, 2, 100] if not INTERPRET else [1, bs - 1, bs + 1, 2 * bs + 3]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen, strided=True)
    scale = head_dim ** -0.5

    out = tp.decode_attention(q, cache.k, cache.v, cache.block_tables, meta.seq_lens, scale,
                              num_splits=num_splits)
    _check(out, _reference(q, cache, meta, scale), dtype)
    one_split = (num_splits or tp.choose_num_splits(len(seq_lens), NUM_KV_HEADS, q.device)) == 1
    assert tp._decode_tma_kernel.count == (decode_path == "tma" and one_split)  # the TMA kernel runs one split only


@pytest.mark.parametrize("dtype", _params(GPU_DTYPES, [torch.float32]))
@pytest.mark.parametrize("gqa", _params([1, 7, 8], [7]))
@pytest.mark.parametrize("num_splits", _params([None, 2, 5, 16, 32], [4, 16]))
def test_decode_split_kv(dtype, gqa, num_splits, decode_path):
    """Small batch, long context, many splits (some empty), and seq_len-0 padding rows (CUDA-graph style)."""
    if decode_path == "tma":
        pytest.skip("more than one split: the TMA kernel does not run (test_decode_tma_not_taken)")
    _skip_same_path(decode_path, dtype)
    gen = torch.Generator().manual_seed(2)
    bs, head_dim = 16, 64
    seq_lens = [3000, 777, 1] if not INTERPRET else [300, 65, 1]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens) + 2, NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    # Two padding rows: seq_len 0, block table all zeros (block 0 is poisoned).
    seq_lens_padded = torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([cache.block_tables, torch.zeros_like(cache.block_tables[:2])])
    scale = head_dim ** -0.5

    out = tp.decode_attention(q, cache.k, cache.v, tables, seq_lens_padded, scale, num_splits=num_splits)
    assert torch.isfinite(out[-2:]).all()
    _check(out[:-2], _reference(q[:-2], cache, meta, scale), dtype)


# ------------------------------------------------------------------------------------ shared prefixes

def _fork(cache: PagedCache, groups) -> torch.Tensor:
    """Make each group's members share its first row's first ``k`` blocks in ``cache.block_tables`` (forked
    samples: what the plan and the reference see), and return the tables as they were, each row with blocks of its
    own and other data in them."""
    own = cache.block_tables.clone()
    for rows, k in groups:
        cache.block_tables[rows[1:], :k] = cache.block_tables[rows[0], :k]
    return own


def _kernel_tables(cache: PagedCache, own: torch.Tensor, plan) -> torch.Tensor:
    """The tables the kernels get: the planned groups' first rows as forked, every other row its own blocks. A row
    then reads its shared blocks through its group's first row only by way of the shared-prefix pass, so the
    result says whether the pass ran."""
    tables = own.clone()
    leaders = [i for i, size in enumerate(plan[1]) if size]
    tables[leaders] = cache.block_tables[leaders]
    return tables


def _shared_plan(cache: PagedCache, seq_lens, gqa, pad: int = 0):
    """``plan_shared_prefixes`` on the cache's tables (one-block groups allowed), and as the kernels take it, with
    ``pad`` rows in no group."""
    tables = cache.block_tables.cpu().tolist()
    plan = plan_shared_prefixes(tables, seq_lens, cache.block_size, tp.SHARED_PREFIX_ROWS // gqa, 1)
    assert plan is not None
    return plan, SharedPrefixes(*(torch.tensor(v + [0] * pad, dtype=torch.int32, device=DEVICE) for v in plan))


def _force_tma(monkeypatch) -> None:
    """One-warp launches at any batch, so that one-split decode of block size 16 takes the TMA kernel."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < tp._TMA_MIN_CAPABILITY:
        pytest.skip("the TMA decode kernel needs Hopper or later")
    monkeypatch.setattr(tp, "_ONE_WARP_MIN_PROGRAMS_PER_SM", 0)


@pytest.mark.parametrize("dtype", _params([torch.bfloat16, torch.float16], [torch.float16]))  # (interpreter: no bf16)
@pytest.mark.parametrize("head_dim,gqa", _params([(64, 1), (64, 7), (128, 7), (128, 8), (128, 16), (16, 2)],
                                                 [(64, 7), (128, 8), (16, 2)]))
def test_decode_tma(dtype, head_dim, gqa, monkeypatch):
    """The TMA decode kernel (one split, one-warp launch, block size 16) against the oracle, the gather kernel
    forbidden: every tail length of the last block (0-16 keys past whole blocks, one or two blocks before it; on the
    GPU also long rows), and seq_len-0 padding rows whose tables are all block 0; the cache past each context is
    NaN, and it is a view into a larger allocation (as the engine's per-layer caches are)."""
    _force_tma(monkeypatch)
    monkeypatch.setattr(tp, "_decode_kernel", None)  # the gather kernel would raise: the TMA path ran
    gen = torch.Generator().manual_seed(9)
    seq_lens = [16 * (1 + t % 2) + t for t in range(17)] + ([] if INTERPRET else [1, 500, 1023])
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, 16, dtype, gen)
    k, v = (torch.stack([torch.zeros_like(c), c])[1] for c in (cache.k, cache.v))  # views at an offset
    assert k.data_ptr() != cache.k.data_ptr() and torch.equal(k.isnan(), cache.k.isnan())
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens) + 2, NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    seq_lens_padded = torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([cache.block_tables, torch.zeros_like(cache.block_tables[:2])])
    scale = head_dim ** -0.5

    out = tp.decode_attention(q, k, v, tables, seq_lens_padded, scale, num_splits=1)
    assert (out[-2:] == 0).all()
    _check(out[:-2], _reference(q[:-2], cache, meta, scale), dtype)


def test_decode_tma_not_taken(monkeypatch):
    """With the TMA kernel allowed and forbidden to run: a launch of several splits reads through the gather kernel
    and equals the oracle, with and without a shared-prefix plan (which a split launch ignores)."""
    _force_tma(monkeypatch)
    monkeypatch.setattr(tp, "_decode_tma_kernel", None)
    dtype, head_dim, gqa = (torch.float16 if INTERPRET else torch.bfloat16), 64, 7
    gen = torch.Generator().manual_seed(10)
    seq_lens = [3 * 16 + 5, 3 * 16 + 9, 40]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, 16, dtype, gen)
    assert tp._tma_decode_ok(cache.k[:1, 0], cache.k, cache.v)  # the tensors alone would take it
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    out = tp.decode_attention(q, cache.k, cache.v, cache.block_tables, meta.seq_lens, scale, num_splits=3)
    _check(out, _reference(q, cache, meta, scale), dtype)

    own = _fork(cache, [([0, 1], 3)])  # rows 0 and 1 now share 3 blocks (in meta's tables too)
    plan, shared = _shared_plan(cache, seq_lens, gqa)
    assert plan[1][0] == 2
    out = tp.decode_attention(q, cache.k, cache.v, own, meta.seq_lens, scale, num_splits=2, shared_prefixes=shared)
    _check(out, _reference(q, cache, dataclasses.replace(meta, block_tables=own), scale), dtype)


def test_tma_decode_ok():
    """Which tensors the TMA kernel takes (the capability check aside): 16-bit caches of q's dtype, block size 16,
    power-of-two head dims of 16-128, non-empty, 16-byte aligned base and strides (views into a larger cache too)."""
    def ok(dtype=torch.bfloat16, block_size=16, head_dim=128, q_dtype=None, kvh=4, num_blocks=3, cache=None,
           v_cache=None):
        if cache is None:
            cache = torch.zeros(num_blocks, block_size, kvh, head_dim, dtype=dtype)
        v_cache = torch.zeros_like(cache) if v_cache is None else v_cache
        return tp._tma_decode_ok(torch.zeros(2, kvh, head_dim, dtype=q_dtype or cache.dtype), cache, v_cache)

    assert ok() and ok(torch.float16, head_dim=64) and ok(head_dim=16)
    assert not ok(torch.float32) and not ok(q_dtype=torch.float16)
    assert not ok(block_size=8) and not ok(block_size=32)
    assert not ok(head_dim=96) and not ok(head_dim=8) and not ok(head_dim=256) and not ok(num_blocks=0)
    big = torch.zeros(2, 3, 16, 4, 128, dtype=torch.bfloat16)
    assert ok(cache=big[1])  # the engine's per-layer views
    flat = torch.zeros(1 + 3 * 16 * 4 * 128, dtype=torch.bfloat16)
    assert not ok(cache=flat[1:].view(3, 16, 4, 128))  # base off 16 bytes
    assert not ok(cache=big[1], v_cache=flat[1:].view(3, 16, 4, 128))  # V's too
    assert not ok(cache=big[1], v_cache=torch.zeros(3, 16, 4, 128, dtype=torch.float16))  # V of another dtype
    assert not ok(cache=torch.zeros(3, 16, 4, 132, dtype=torch.bfloat16)[..., :128])  # rows of 264 bytes


@pytest.mark.parametrize("case", ATTN_CASES, ids=_ids)
@pytest.mark.parametrize("num_splits,prefix_splits",
                         _params([(None, 1), (1, 1), (1, 2), (1, 5), (1, None), (3, 1)],
                                 [(None, 1), (None, 3), (1, None), (3, 1)]))
def test_decode_shared_prefix(case, num_splits, prefix_splits, decode_path):
    """Groups of rows that share their first blocks read them once (the shared-prefix pass, then each row's own
    keys): a group of three whose last row's whole context is the shared prefix, a row alone, a group of two (its
    second row's own keys three whole blocks, no partial one), a one-token row, and two padding rows (seq_len 0,
    zeros in the plan). The pass in one program per group and KV head, or in several over ranges of the prefix
    (some empty: 5 ranges of whole tiles over 2-3 blocks; None, as ``choose_prefix_splits`` picks: 4 or 8 under
    the interpreter's 8 "SMs"). A launch of more than one split ignores the plan and reads every row's context
    through its own table (``_fork``); one of one split reads the rows' own keys through the TMA kernel where it
    runs at all."""
    dtype, head_dim, gqa, bs = case
    _skip_same_path(decode_path, dtype, head_dim, bs)
    gen = torch.Generator().manual_seed(6)
    seq_lens = [3 * bs + 5, 4 * bs + 1, 3 * bs, bs + 2, 2 * bs + 1, 5 * bs, 1]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    own = _fork(cache, [([0, 1, 2], 3), ([4, 5], 2)])
    plan, shared = _shared_plan(cache, seq_lens, gqa, pad=2)
    assert plan == ([3 * bs] * 3 + [0, 2 * bs, 2 * bs, 0], [3, 0, 0, 0, 2, 0, 0])
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens) + 2, NUM_KV_HEADS * gqa, head_dim, dtype, gen, strided=True)
    seq_lens_padded = torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    tables = torch.cat([_kernel_tables(cache, own, plan), torch.zeros_like(own[:2])])
    scale = head_dim ** -0.5
    pass_runs = (num_splits or tp.choose_num_splits(len(seq_lens) + 2, NUM_KV_HEADS, q.device)) == 1

    out = tp.decode_attention(q, cache.k, cache.v, tables, seq_lens_padded, scale, num_splits=num_splits,
                              shared_prefixes=shared, prefix_splits=prefix_splits)
    assert torch.isfinite(out[-2:]).all()
    expected = meta if pass_runs else dataclasses.replace(meta, block_tables=own)
    _check(out[:-2], _reference(q[:-2], cache, expected, scale), dtype)
    assert tp._decode_tma_kernel.count == (decode_path == "tma" and pass_runs)  # with the plan, one split only


@pytest.mark.parametrize("gqa", _params([1, 7, 8], [7, 8]))
def test_decode_shared_prefix_full_tile(gqa, monkeypatch):
    """As many rows as a group's tile holds (SHARED_PREFIX_ROWS // gqa), then two more that form a second group:
    every tile row in use (gqa 8: 64 of 64; 7: 63), through ``paged_attention`` with a launch of one split."""
    monkeypatch.setattr(tp, "choose_num_splits", lambda *args: 1)
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    bs, head_dim = 16, 64
    members = tp.SHARED_PREFIX_ROWS // gqa
    seq_lens = [2 * bs + 1 + 3 * i for i in range(members + 2)]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    own = _fork(cache, [(list(range(members + 2)), 2)])
    plan, shared = _shared_plan(cache, seq_lens, gqa)
    assert plan[1] == [members] + [0] * (members - 1) + [2, 0]
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    q = _queries(len(seq_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5

    kernel_meta = dataclasses.replace(meta, block_tables=_kernel_tables(cache, own, plan), shared_prefixes=shared)
    out = tp.paged_attention(q, cache.k, cache.v, kernel_meta, scale)
    _check(out, _reference(q, cache, meta, scale), dtype)


@pytest.mark.parametrize("gqa", [7, 8])
def test_decode_shared_prefix_group_size_past_the_batch_is_cut(gqa):
    """A group size that runs past the last row (a stale plan) is cut at the batch: the group's rows are right, and
    nothing is written past it (under the interpreter, a write past the pass's [batch]-row scratch crashes)."""
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    gen = torch.Generator().manual_seed(8)
    bs, head_dim = 16, 64
    seq_lens = [2 * bs + 3, 2 * bs + 7, 3 * bs + 1]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    own = _fork(cache, [([0, 1, 2], 2)])
    meta = _meta([1] * 3, seq_lens, 3, cache)
    shared = SharedPrefixes(torch.tensor([2 * bs] * 3, dtype=torch.int32, device=DEVICE),
                            torch.tensor([100, 0, 0], dtype=torch.int32, device=DEVICE))
    q = _queries(3, NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    # two output rows more, poisoned: a write past the batch would change them
    out = torch.full((5, NUM_KV_HEADS * gqa, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    tp.decode_attention(q, cache.k, cache.v, own, meta.seq_lens, scale, out=out[:3], num_splits=1,
                        shared_prefixes=shared)
    assert torch.isnan(out[3:]).all()
    _check(out[:3], _reference(q, cache, meta, scale), dtype)


@pytest.mark.parametrize("path", ["gather", "tma"])
def test_decode_shared_prefix_inside_a_block(path, monkeypatch):
    """A plan whose prefix ends inside a block (the planner's never do: they are whole blocks; the kernels take any):
    the pass reads keys [0, prefix), each row its own from there, the rest of that block masked. The group's rows
    end inside the prefix's last block, on a block boundary, and blocks later; a row in no group reads its own."""
    if path == "tma":
        _force_tma(monkeypatch)
        monkeypatch.setattr(tp, "_decode_kernel", None)  # the gather kernel would raise: the TMA path ran
    else:
        monkeypatch.setattr(tp, "_tma_decode_ok", lambda *_: False)
    dtype, head_dim, gqa, bs = (torch.float16 if INTERPRET else torch.bfloat16), 64, 7, 16
    gen = torch.Generator().manual_seed(11)
    seq_lens = [3 * bs + 5, 2 * bs + 9, 3 * bs, 4 * bs + 3, 2 * bs + 1]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    own = _fork(cache, [([0, 1, 2, 3], 3)])  # rows 1-3's first 3 blocks are row 0's
    meta = _meta([1] * len(seq_lens), seq_lens, len(seq_lens), cache)
    prefix = 2 * bs + 3  # inside block 2; row 4 is in no group
    shared = SharedPrefixes(torch.tensor([prefix] * 4 + [0], dtype=torch.int32, device=DEVICE),
                            torch.tensor([4, 0, 0, 0, 0], dtype=torch.int32, device=DEVICE))
    # Rows 1-3 read keys [0, 32) only through the pass (row 0's table) and the rest of block 2 through their own
    # tables, which hold row 0's block 2 there (the part of the block past the prefix is theirs to read).
    tables = own.clone()
    tables[0] = cache.block_tables[0]
    tables[1:4, 2] = cache.block_tables[0, 2]
    q = _queries(len(seq_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    for splits in (1, 3):
        out = tp.decode_attention(q, cache.k, cache.v, tables, meta.seq_lens, scale, num_splits=1,
                                  shared_prefixes=shared, prefix_splits=splits)
        _check(out, _reference(q, cache, meta, scale), dtype)


def test_choose_prefix_splits(monkeypatch):
    """Ranges of the shared-prefix pass by the batch: about 2 programs an SM over the fewest groups the rows form,
    a power of two, 1 to 8 (the 7B shape on an H200: 2 at 256 rows, 4 at 128, 8 at 64); the constant overrides."""
    monkeypatch.setattr(tp, "_sms", lambda device: 132)
    cpu = torch.device("cpu")
    assert [tp.choose_prefix_splits(b, 4, 7, cpu) for b in (512, 256, 192, 128, 64, 33, 1)] == [1, 2, 2, 4, 8, 8, 8]
    assert tp.choose_prefix_splits(256, 8, 8, cpu) == 1  # 32 groups of 8 rows x 8 KV heads: 256 programs
    assert tp.choose_prefix_splits(256, 2, 1, cpu) == 8  # 4 groups of 64 rows x 2 KV heads
    assert tp.choose_prefix_splits(256, 1, 128, cpu) == 1  # a group of 128 heads: one row a group, 256 programs
    monkeypatch.setattr(tp, "SHARED_PREFIX_SPLITS", 3)
    assert tp.choose_prefix_splits(64, 4, 7, cpu) == 3
    monkeypatch.setattr(tp, "SHARED_PREFIX_SPLITS", 0)
    with pytest.raises(ValueError, match="SHARED_PREFIX_SPLITS"):
        tp.choose_prefix_splits(64, 4, 7, cpu)


def test_decode_config_by_batch():
    """One-warp programs from 4 programs per SM (rl-7b's 256 x 4 at 132 SMs), 16-bit at head dim <= 128 and
    query groups <= 16 only."""
    one_warp = dict(BLOCK_N=32, num_warps=1, num_stages=2)
    assert tp._decode_config(128, 16, torch.bfloat16, 256 * 4, 132) == one_warp
    assert tp._decode_config(64, 16, torch.float16, 4 * 132, 132) == one_warp
    assert tp._decode_config(128, 16, torch.bfloat16, 4 * 132 - 1, 132)["num_warps"] == 4
    assert tp._decode_config(256, 16, torch.bfloat16, 4096, 132)["num_warps"] == 4
    assert tp._decode_config(128, 32, torch.bfloat16, 4096, 132)["num_warps"] == 4  # one warp would spill
    assert tp._decode_config(128, 16, torch.float32, 4096, 132) == dict(BLOCK_N=32, num_warps=4, num_stages=3)


def test_num_splits_is_static():
    """The split count depends on shapes only (CUDA-graph safe)."""
    dev = torch.device(DEVICE)
    assert tp.choose_num_splits(1, 2, dev) > 1
    assert tp.choose_num_splits(4096, 8, dev) == 1
    assert all(1 <= tp.choose_num_splits(b, kvh, dev) <= 32 for b in (1, 3, 64) for kvh in (1, 8))


# ------------------------------------------------------------------------------------------------ prefill

def _prefill_shapes(bs):
    """(query_len, seq_len) pairs: full prompts and chunks on a cached prefix, around block/tile edges."""
    if INTERPRET:
        return [(1, 1), (bs + 1, bs + 1), (5, 2 * bs + 3), (70, 75)]
    return [(1, 1), (bs - 1 or 1, bs - 1 or 1), (bs, bs), (bs + 1, 3 * bs + 2), (64, 64), (65, 200),
            (130, 130), (3, 517), (200, 1000), (1, 77)]


@pytest.mark.parametrize("case", ATTN_CASES, ids=_ids)
def test_prefill(case):
    dtype, head_dim, gqa, bs = case
    gen = torch.Generator().manual_seed(3)
    shapes = _prefill_shapes(bs)
    query_lens, seq_lens = [s[0] for s in shapes], [s[1] for s in shapes]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    meta = _meta(query_lens, seq_lens, 0, cache)
    q = _queries(sum(query_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen, strided=True)
    scale = head_dim ** -0.5

    out = tp.prefill_attention(q, cache.k, cache.v, cache.block_tables, meta.query_start_loc, meta.seq_lens,
                               meta.max_query_len, scale)
    _check(out, _reference(q, cache, meta, scale), dtype)


# ------------------------------------------------------------------------------------------- mixed batch

@pytest.mark.parametrize("case", _params(ATTN_CASES[::3], ATTN_CASES[:2]), ids=_ids)
def test_paged_attention_mixed(case):
    """Decodes first, then prefill chunks (a fresh prompt and chunks over cached prefixes)."""
    dtype, head_dim, gqa, bs = case
    gen = torch.Generator().manual_seed(4)
    decode_lens = [1, bs + 1, 40] if not INTERPRET else [1, bs + 1]
    prefill = [(bs + 3, bs + 3), (7, 3 * bs), (33, 50)] if not INTERPRET else [(bs + 3, bs + 3), (7, 2 * bs)]
    query_lens = [1] * len(decode_lens) + [p[0] for p in prefill]
    seq_lens = decode_lens + [p[1] for p in prefill]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    meta = _meta(query_lens, seq_lens, len(decode_lens), cache)
    q = _queries(sum(query_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5

    out = tp.paged_attention(q, cache.k, cache.v, meta, scale)
    _check(out, _reference(q, cache, meta, scale), dtype)


def test_paged_attention_after_store_kv():
    """End to end: store the new tokens' K/V with store_kv, then attend (decodes + a chunk on a prefix)."""
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    bs, head_dim, gqa = 16, 64, 2
    query_lens, seq_lens = [1, 1, 9, 20], [5, 33, 40, 20]
    cache = PagedCache(seq_lens, NUM_KV_HEADS, head_dim, bs, dtype, gen)
    meta = _meta(query_lens, seq_lens, 2, cache)
    k_new = torch.randn(sum(query_lens), NUM_KV_HEADS, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_new = torch.randn(sum(query_lens), NUM_KV_HEADS, head_dim, generator=gen).to(dtype).to(DEVICE)
    tp.store_kv(k_new, v_new, cache.k, cache.v, meta.slot_mapping)
    reference.write_kv(k_new, v_new, cache.k_ref, cache.v_ref, meta.slot_mapping)
    q = _queries(sum(query_lens), NUM_KV_HEADS * gqa, head_dim, dtype, gen)
    scale = head_dim ** -0.5

    out = tp.paged_attention(q, cache.k, cache.v, meta, scale)
    _check(out, _reference(q, cache, meta, scale), dtype)
