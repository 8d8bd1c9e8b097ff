"""The block manager alone: reference counts, prefix hits, copy-on-write, LRU reuse, the free+used invariant."""

from __future__ import annotations

from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.sequence import Request, Sequence
from rlserve.sampling import SamplingParams


def make_seq(tokens, n=1):
    request = Request("r", list(tokens), SamplingParams(n=n), seed=0)
    return Sequence(request, 0, list(tokens))


def test_allocate_and_free_keep_invariant():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(10))
    assert bm.can_allocate(seq, [], 10)
    bm.allocate(seq, [], 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.check_invariants()
    bm.free(seq)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_hit_after_compute_and_leaves_one_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = make_seq(range(12))
    bm.allocate(a, [], 12)
    a.num_computed_tokens = 12
    bm.register_computed_blocks(a)
    assert bm.num_cached_blocks == 3
    b = make_seq(range(12))  # same prompt: 2 full blocks hit, the last token is left to compute
    hits = bm.find_cached_prefix(b)
    assert hits == a.block_table[:2]
    c = make_seq(list(range(8)) + [99, 98, 97, 96, 95])
    assert bm.find_cached_prefix(c) == a.block_table[:2]
    d = make_seq([7] + list(range(1, 12)))  # differs in the first block: no hit at all
    assert bm.find_cached_prefix(d) == []


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)
    a.num_computed_tokens = 5
    bm.register_computed_blocks(a)
    blocks = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    b = make_seq([1, 2, 3, 4, 9])
    hits = bm.find_cached_prefix(b)
    assert hits == blocks[:2]
    assert bm.can_allocate(b, hits, 1)
    bm.allocate(b, hits, 1)
    assert b.num_computed_tokens == 4 and bm.ref_counts[blocks[0]] == 1
    bm.check_invariants()
    bm.free(b)
    # Freed tail first: the first block of the prompt is the last to be reused.
    order = list(bm.free_queue)
    assert order.index(blocks[0]) > order.index(blocks[1])


def test_fork_shares_blocks_and_copy_on_write_for_partial_block():
    bm = BlockManager(num_blocks=10, block_size=4)
    parent = make_seq(range(6), n=3)
    bm.allocate(parent, [], 6)
    parent.num_computed_tokens = 6
    children = [Sequence(parent.request, i, list(parent.token_ids)) for i in (1, 2)]
    for child in children:
        bm.fork(parent, child)
    assert bm.num_free_blocks == 8  # still only the parent's two blocks
    assert all(bm.ref_counts[b] == 3 for b in parent.block_table)
    copies = bm.append_slots(children[0], 1)  # writes into the shared, partly filled second block
    assert len(copies) == 1 and copies[0][0] == parent.block_table[1]
    assert children[0].block_table[0] == parent.block_table[0]
    assert children[0].block_table[1] != parent.block_table[1]
    bm.check_invariants()
    for s in [parent] + children:
        bm.free(s)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_reset_prefix_cache_forgets_and_stops_registration():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)
    a.num_computed_tokens = 4
    bm.register_computed_blocks(a)
    assert bm.num_cached_blocks == 2
    bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0
    a.num_computed_tokens = 5
    a.token_ids.append(6)
    a.num_computed_tokens = 6
    bm.register_computed_blocks(a)  # blocks computed before the reset are not offered again
    assert bm.num_cached_blocks == 0
    bm.free(a)
    bm.check_invariants()


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a, [], 5)
    a.num_computed_tokens = 5
    bm.register_computed_blocks(a)
    assert bm.find_cached_prefix(make_seq([1, 2, 3, 4, 5])) == []
