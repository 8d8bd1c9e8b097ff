"""What every attention backend receives for one engine step.

The batch is flat: the new tokens of all scheduled sequences are concatenated, sequences whose query is a
single token (decodes) first, then the ones with longer queries (prefill chunks). Each sequence reads its
whole context -- cached prefix plus the new tokens -- from the paged KV cache through its block table.

KV cache layout, per layer: ``k_cache``, ``v_cache`` of shape ``[num_blocks, block_size, num_kv_heads,
head_dim]``; token ``i`` of a sequence lives in block ``block_table[i // block_size]`` at offset
``i % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class SharedPrefixes(NamedTuple):
    """Decode rows grouped by a shared prefix (``plan_shared_prefixes``), on the device: [num_decodes] int32 each."""
    lens: torch.Tensor  # keys [0, n) of the row are its group's shared prefix (0: in no group)
    group_sizes: torch.Tensor  # at a group's first row, its number of rows; else 0

    def rows(self, end: int) -> SharedPrefixes:
        return SharedPrefixes(self.lens[:end], self.group_sizes[:end])


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat cache slot of each new token (-1: padding, not written)
    query_start_loc: torch.Tensor  # [B+1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    num_decodes: int  # sequences [0, num_decodes) have exactly one query token
    max_query_len: int
    max_seq_len: int
    # Host copies, so that backends can plan without a device sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Decode rows that share their first blocks, for a backend that reads such a prefix once a group; None: no
    # group this step, or a backend without that pass.
    shared_prefixes: SharedPrefixes | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes


def plan_shared_prefixes(tables: Sequence[Sequence[int]], seq_lens: Sequence[int], block_size: int,
                         max_members: int, min_blocks: int) -> tuple[list[int], list[int]] | None:
    """Groups of consecutive decode rows whose contexts begin with the same cache blocks (the samples of one
    prompt, or prompts that hit the same cached prefix), for a backend that reads a shared prefix once a group.

    ``tables``: each decode row's block table; ``seq_lens``: its context length this step. A group is a run of
    2..``max_members`` rows whose tables agree on their first ``k >= min_blocks`` blocks: its first two rows set
    ``k``, and the rows after join while they share all ``k`` (so that the next prompt's samples, sharing only a
    cached system prompt with this one, start a group of their own instead of shrinking this one's). ``k`` counts
    only blocks wholly below every member's context length (``seq_len // block_size``): full ones. One of them may
    hold a member's newest token (a ``seq_len`` that is a multiple of the block size); a block that is written to
    is still never in two tables, as copy-on-write gives a writer its own.

    Returns ``(prefix_lens, group_sizes)`` -- per row ``k * block_size`` for a group's members (else 0), and at a
    group's first row its number of rows (else 0) -- or None when no group of two or more rows forms. A
    multi-step launch may reuse the plan for its later steps: contexts only grow, and the shared blocks stay."""
    n = len(tables)
    if n < 2 or max(seq_lens) < min_blocks * block_size:
        return None
    prefix_lens, group_sizes = [0] * n, [0] * n
    grouped = False
    last_needed = max(min_blocks, 1) - 1  # rows that differ at this block cannot share enough (a check in O(1))
    i = 0
    while i < n:
        lead = tables[i]
        k = min(seq_lens[i] // block_size, len(lead))
        j = i + 1
        while j < n and j - i < max_members and k >= min_blocks:
            table = tables[j]
            c = min(k, seq_lens[j] // block_size, len(table))
            if c < min_blocks or table[last_needed] != lead[last_needed]:
                break
            if table[:c] != lead[:c]:
                c = next(x for x in range(c) if table[x] != lead[x])
            if c < min_blocks or (j > i + 1 and c < k):  # the second row sets k; later ones must share it all
                break
            k = c
            j += 1
        if j - i > 1:
            prefix_lens[i:j] = [k * block_size] * (j - i)
            group_sizes[i] = j - i
            grouped = True
        i = j
    return (prefix_lens, group_sizes) if grouped else None
