"""The KV-cache block manager: which sequence owns which cache block. No torch in here.

- Blocks are reference-counted: the samples of one prompt, and requests with a common prefix, share blocks.
- Prefix caching: a full block is identified by a chained hash of its tokens and all tokens before it. Once
  computed it is registered; a later sequence with the same prefix takes it instead of recomputing.
- A block whose count drops to zero joins the free queue but keeps its hash, so it can still be hit until it
  is reused. Allocation takes the least recently freed block first (LRU); a sequence frees its blocks tail
  first, so that the shared beginnings of prompts are evicted last.
- A shared block is never written: a sequence about to write into a partly filled block that others also
  hold gets a private copy first (copy-on-write); the copy is done on the device by the model runner.
- Invariant, checked by tests: ``num_free_blocks + num_used_blocks == num_blocks``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from rlserve.engine.sequence import Sequence


def hash_block(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.epoch = 0  # bumped by reset_prefix_cache(); blocks of older epochs are never registered
        self.num_hit_queries = 0
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    # -- accounting --------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return sum(1 for c in self.ref_counts if c > 0)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # -- prefix lookup -----------------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Hashes of the sequence's first ``num_blocks`` full blocks, computed once and kept on it."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:num_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the start of a sequence that holds no blocks yet.

        At least one token is always left to compute, so that the step produces logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._full_block_hashes(seq, max_blocks):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    # -- allocation for a sequence that holds no blocks --------------------------------------------
    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Room for the cached prefix ``hits`` plus ``num_new_tokens`` computed after it?"""
        needed = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # hits sitting in the free queue
        return needed + revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        assert not seq.block_table, "allocate() is for sequences without blocks"
        for block in hits:
            self._take(block)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_registered_blocks = len(hits)
        seq.cache_epoch = self.epoch
        for _ in range(self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(hits)):
            seq.block_table.append(self._pop_free())
        self.num_queried_tokens += seq.num_tokens
        self.num_hit_tokens += seq.num_computed_tokens
        self.num_hit_queries += bool(hits)

    # -- growth of a sequence that holds blocks ----------------------------------------------------
    def _needs_copy(self, seq: Sequence) -> bool:
        """Would the next token land in a partly filled block that is shared?"""
        if seq.num_computed_tokens % self.block_size == 0:
            return False
        last = seq.block_table[seq.num_computed_tokens // self.block_size]
        return self.ref_counts[last] > 1

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(needed, 0) + self._needs_copy(seq) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for the next ``num_new_tokens``; returns (src, dst) block copies to run first."""
        copies = []
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            src = seq.block_table[index]
            dst = self._pop_free()
            self._release(src)
            seq.block_table[index] = dst
            copies.append((src, dst))
        for _ in range(self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)):
            seq.block_table.append(self._pop_free())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child starts with the parent's blocks, shared."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        child.cache_epoch = parent.cache_epoch

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # -- prefix-cache registration -----------------------------------------------------------------
    def register_computed_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly computed full blocks to the prefix cache."""
        if not self.enable_prefix_caching or seq.cache_epoch != self.epoch:
            return
        # Under async scheduling the KV of a token still being drawn may be computing: only known tokens hash.
        num_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block, h = seq.block_table[i], hashes[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        seq.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (after a weight update). Blocks in use stay with their owners, who
        will not offer them again."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.epoch += 1

    def check_invariants(self) -> None:
        used = self.num_used_blocks
        assert used + self.num_free_blocks == self.num_blocks, (used, self.num_free_blocks, self.num_blocks)
        for b in self.free_queue:
            assert self.ref_counts[b] == 0, b
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h

    # -- internals ---------------------------------------------------------------------------------
    def _pop_free(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        self._forget_hash(block)
        self.ref_counts[block] = 1
        return block

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_queue[block]
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def _forget_hash(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
