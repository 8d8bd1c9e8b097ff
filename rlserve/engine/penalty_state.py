"""Penalty state kept on the device between steps: one row per running penalised sequence.

Repetition, presence and frequency penalties read, per sequence, which token ids it has seen (prompt and
output, for the repetition penalty) and how often each was drawn (output only, for presence and frequency).
Rebuilding that over [rows, vocab] from every sequence's token ids each step moves O(total tokens) to the
device and scatters them all again; here, as in vLLM v1's persistent batch, each penalised sequence owns a
*slot* -- a row of ``seen`` and of ``counts`` -- filled once from its tokens when it first samples, and each
later step adds only the tokens appended since (the one drawn the step before).

Async scheduling: a sequence whose previous draw is still on the device (not yet in its token ids) has that
draw counted from the device (``pending_draws``, set by the runner), so that penalised batches overlap too; the
step's one host-to-device copy then goes through the runner's pinned upload (``upload``), which does not wait.

A sequence gives its slot back when it finishes, is preempted or aborted (``release``, called where its
block-table row is released). A slot is overwritten whole when it is handed out, so nothing of a previous
owner survives; a preempted sequence starts over with a fresh fill when it samples again.

The buffers are allocated on first use, ``num_slots`` (max_num_seqs) x vocab: at 512 x 151,936, 156 MB of
int16 counts plus 78 MB of bool ``seen`` (int32 counts, 311 MB, when max_model_len reaches 32,768, so that
a count cannot overflow). The CUDA memory profile reserves them (``ModelRunner.profile_free_memory``).

It knows nothing of the sampler's arithmetic (``sampler._apply_penalties``) or of the scheduler.
"""

from __future__ import annotations

from typing import Callable

import torch

from rlserve.engine.sequence import Sequence


def counts_dtype(max_model_len: int) -> torch.dtype:
    """The narrowest integer type that holds any count a sequence of max_model_len tokens can reach."""
    return torch.int16 if max_model_len <= torch.iinfo(torch.int16).max else torch.int32


class PenaltyState:
    def __init__(self, num_slots: int, max_model_len: int, device: torch.device):
        self.num_slots = num_slots
        self.dtype = counts_dtype(max_model_len)
        self.device = device
        self.counts: torch.Tensor | None = None  # [num_slots, V] int16/int32: output-token counts
        self.seen: torch.Tensor | None = None  # [num_slots, V] bool: prompt or output tokens
        self.slot_of: dict[int, int] = {}  # seq_id -> slot
        self.num_counted: dict[int, int] = {}  # seq_id -> its leading tokens already in its slot
        self.free_slots = list(range(num_slots - 1, -1, -1))
        # Async scheduling: sequences -> their draws still on the device, [len] int64 (None: never needed).
        self.pending_draws: Callable[[list[Sequence]], torch.Tensor] | None = None
        # Async scheduling: int64 values -> a device tensor, copied without waiting for the step in flight (a
        # pageable copy would wait); the runner's ``_upload``. None (sync mode): a plain copy, as always.
        self.upload: Callable[[list[int]], torch.Tensor] | None = None

    def allocate(self, vocab_size: int) -> None:
        if self.counts is None or self.counts.shape[1] != vocab_size:
            self.counts = torch.zeros(self.num_slots, vocab_size, dtype=self.dtype, device=self.device)
            self.seen = torch.zeros(self.num_slots, vocab_size, dtype=torch.bool, device=self.device)

    def free_buffers(self) -> None:
        """Drop the buffers (after the memory profile); the next penalised sequence allocates them again."""
        assert not self.slot_of, "free_buffers() while sequences hold slots"
        self.counts = self.seen = None

    def update(self, penalty_rows: list[tuple[int, Sequence]], vocab_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bring the slots of this step's penalised sample rows -- (row, sequence) pairs; a forking parent has
        one per sample, all reading its slot -- up to date with one host-to-device copy. Returns the rows and
        their slots as device tensors, [P] int64 each."""
        self.allocate(vocab_size)
        fill_slots, rows, ids, prompt_rows, prompt_ids = [], [], [], [], []
        slot_of_row, pending_slots, pending_seqs = [], [], []
        for _, seq in penalty_rows:
            slot = self.slot_of.get(seq.seq_id)
            if slot is None:  # a new owner: its whole row is overwritten, prompt and outputs so far
                slot = self.slot_of[seq.seq_id] = self._take_slot()
                fill_slots.append(slot)
                distinct = distinct_prompt_ids(seq)
                prompt_rows += [slot] * len(distinct)
                prompt_ids += distinct
                start = seq.num_prompt_tokens
            else:  # the tokens appended since its last step (none for a forking parent's second sample)
                start = self.num_counted[seq.seq_id]
            new = seq.token_ids[start:]
            rows += [slot] * len(new)
            ids += new
            counted = start + len(new)
            if seq.num_pending_tokens and counted == len(seq.token_ids):  # its last draw is still on the device
                pending_slots.append(slot)
                pending_seqs.append(seq)
                counted += 1
            self.num_counted[seq.seq_id] = counted
            slot_of_row.append(slot)
        f, n, p = len(fill_slots), len(rows), len(prompt_rows)
        values = (fill_slots + rows + ids + prompt_rows + prompt_ids + [r for r, _ in penalty_rows] + slot_of_row
                  + pending_slots)
        if self.upload is not None:  # async scheduling: the runner's upload (pinned on CUDA, no wait)
            packed = self.upload(values)
        else:
            packed = torch.tensor(values, dtype=torch.int64).to(self.device, non_blocking=True)
        if f:
            fill = packed[:f]
            self.counts[fill] = 0
            self.seen[fill] = False
            self.seen[packed[f + 2 * n:f + 2 * n + p], packed[f + 2 * n + p:f + 2 * n + 2 * p]] = True
        if n:
            self._count(packed[f:f + n], packed[f + n:f + 2 * n])
        num_rows = len(penalty_rows)
        tail = packed[f + 2 * n + 2 * p:]
        if pending_seqs:
            self._count(tail[2 * num_rows:], self.pending_draws(pending_seqs))
        return tail[:num_rows], tail[num_rows:2 * num_rows]

    def _count(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Add tokens to their slots' counts and seen masks (slots [K], token ids [K], on the device)."""
        self.counts.index_put_((slots, token_ids), torch.ones(len(slots), dtype=self.dtype, device=self.device),
                               accumulate=True)
        self.seen[slots, token_ids] = True

    def _take_slot(self) -> int:
        if not self.free_slots:
            raise RuntimeError(f"no free penalty slot: more than max_num_seqs ({self.num_slots}) penalised "
                               f"sequences hold one (a sequence ended without release())")
        return self.free_slots.pop()

    def release(self, seqs) -> None:
        """Forget finished, preempted or aborted sequences' slots (their rows are overwritten when reused)."""
        for seq in seqs:
            slot = self.slot_of.pop(seq.seq_id, None)
            self.num_counted.pop(seq.seq_id, None)
            if slot is not None:
                self.free_slots.append(slot)


def distinct_prompt_ids(seq: Sequence) -> list[int]:
    """A request's distinct prompt ids, computed once and kept on its sampling row."""
    row = seq.request.sampling_row
    if row.prompt_ids is None:
        row.prompt_ids = sorted(set(seq.request.prompt_token_ids))
    return row.prompt_ids
