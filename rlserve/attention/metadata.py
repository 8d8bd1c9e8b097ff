"""What every attention backend receives for one engine step.

The batch is flat: the new tokens of all scheduled sequences are concatenated, sequences whose query is a
single token (decodes) first, then the ones with longer queries (prefill chunks). Each sequence reads its
whole context -- cached prefix plus the new tokens -- from the paged KV cache through its block table.

KV cache layout, per layer: ``k_cache``, ``v_cache`` of shape ``[num_blocks, block_size, num_kv_heads,
head_dim]``; token ``i`` of a sequence lives in block ``block_table[i // block_size]`` at offset
``i % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_prefills(self) -> int:
        return self.num_seqs - self.num_decodes
