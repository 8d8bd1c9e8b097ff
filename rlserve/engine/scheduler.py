"""Which sequences run in the next step, and with how many tokens. Pure CPU logic, no torch.

Two entry points: ``schedule()`` picks the work of one step under one token budget, and
``update_from_output()`` applies the sampled tokens. Running sequences go first, in arrival order, each
catching up by one decode token or a prefill chunk; when blocks run out, the newest running sequence is
preempted (its blocks freed, to be recomputed later). Waiting sequences are admitted while the budget, the
sequence limit and the free blocks allow, unless a preemption happened this step.

Async scheduling (``async_step.py``) splits ``update_from_output`` in two: ``advance`` at launch (tokens computed,
draws pending) and ``apply_output`` once the draws are on the host, so that the next step can be scheduled in
between; ``schedule`` then counts pending draws as tokens (``Sequence.num_scheduled_tokens``).

Multi-step decoding (``multi_step.py``): a step of plain decodes may run ``num_steps`` > 1 decode steps in one
launch; ``schedule`` allocates the KV slots of all of them, ``advance`` counts them all as computed, and
``apply_output`` appends each sequence's ``num_steps`` draws (those after a stop are dropped).

Prompt logprobs: a request that asks for them computes every prompt position (no prefix-cache hit may skip
one), and the steps that compute its prompt list it in ``SchedulerOutput.prompt_logprobs`` so that the runner
scores those positions; a score-only request (max_tokens=0) ends when its prompt is computed, drawing nothing.

Invariant: at most ``max_num_seqs`` sequences run (a parent that has not forked yet counts once). A request
whose ``n`` exceeds the room left when its prompt is done forks every sample at once -- each draws its first
token from the prompt's logits and shares the prompt's blocks -- but only the samples that fit run; the
others wait at the head of the queue, blocks held, and start as running ones finish.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from rlserve.engine.async_step import can_run_ahead
from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.multi_step import plan_burst
from rlserve.engine.sequence import Request, Sequence, SequenceStatus
from rlserve.engine.validation import check_fits


class ScheduledSeq:
    """A sequence and the tokens it computes this step. ``samples``: the chunk reaches the end of its tokens,
    so a next token is drawn."""
    __slots__ = ("seq", "num_new_tokens", "samples")

    def __init__(self, seq: Sequence, num_new_tokens: int):
        self.seq = seq
        self.num_new_tokens = num_new_tokens
        self.samples = seq.num_computed_tokens + num_new_tokens == seq.num_scheduled_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # gave their blocks back this step
    # The scheduled items computing a prompt whose logprobs were asked for (None when there are none).
    prompt_logprobs: list[ScheduledSeq] | None = None
    # Decode steps this launch runs (multi_step.py), and how many of them each item computes and draws (at most
    # num_steps: fewer for one that reaches its max_tokens sooner). Empty for a one-step launch.
    num_steps: int = 1
    burst_draws: list[int] = field(default_factory=list)

    @property
    def num_preempted(self) -> int:
        return len(self.preempted)

    @property
    def num_batched_tokens(self) -> int:
        if self.num_steps > 1:
            return sum(self.burst_draws)
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class StepResult:
    """What the runner drew, one row per sample, as columns. Scheduled item i's rows start at
    ``first_row[i]`` (-1: it did not sample); a forking parent has one row per sample. A multi-step launch's
    columns hold its steps one after the other: step k's draw of row r is at ``k * len(first_row) + r``."""
    token_ids: list[int]
    first_row: list[int]
    logprobs: list[float] | None = None  # the sampled tokens' (when any row asked)
    # The top N by rank, [S, N] numpy arrays (int32 ids, fp32 logprobs), when any row asked for N > 0: each
    # sample copies its row's first columns, so that no per-token Python object is made.
    top_ids: np.ndarray | None = None
    top_logprobs: np.ndarray | None = None
    # One outputs.PromptLogprobs per SchedulerOutput.prompt_logprobs item: the positions its chunk scored.
    prompt_logprobs: list | None = None
    failed: dict[int, str] = field(default_factory=dict)  # scheduled item -> why its draw failed


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...], num_scheduler_steps: int = 1):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_scheduler_steps = num_scheduler_steps
        self.num_multi_step_launches = 0  # launches that ran more than one decode step
        self.scoring: set[Sequence] = set()  # parents computing a prompt whose logprobs were asked for

    # -- admission ---------------------------------------------------------------------------------
    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> int:
        bm = self.block_manager
        return check_fits(num_prompt_tokens, max_tokens, self.max_model_len, bm.num_blocks * bm.block_size)

    def add_request(self, request: Request) -> None:
        parent = Sequence(request, 0, list(request.prompt_token_ids))
        if request.grammar is not None:
            parent.grammar_state = request.grammar.new_state()
        if request.stop_strings is not None:
            parent.stop_state = request.stop_strings.new_state()
        request.seqs = [parent]
        self.waiting.append(parent)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        bs, ref_counts = bm.block_size, bm.ref_counts
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_pending_tokens and not can_run_ahead(seq, self.max_model_len):
                i += 1  # its token in flight is its last: it runs no more (async scheduling)
                continue
            computed = seq.num_computed_tokens
            n = min(seq.num_scheduled_tokens - computed, budget)
            if n == 1 and computed % bs and ref_counts[seq.block_table[computed // bs]] == 1:
                # The common decode: the token goes into its own, partly filled last block.
                out.scheduled.append(ScheduledSeq(seq, 1))
                budget -= 1
                i += 1
                continue
            while not bm.can_append(seq, n):
                victim = self.running[-1]  # the newest; always at or after position i
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.block_copies += bm.append_slots(seq, n)
                out.scheduled.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
                continue
            break  # the sequence itself gave way: nothing after it can fit either

        # New work only when nothing had to give way this step. A parent counts as all its samples.
        num_live = sum(s.num_samples_to_draw for s in self.running) if self.waiting else 0
        while self.waiting and budget > 0 and not out.num_preempted:
            seq = self.waiting[0]
            if num_live + seq.num_samples_to_draw > self.max_num_seqs and num_live > 0:
                break
            scores = False
            if seq.block_table:  # a forked sample waiting for room: it holds the prompt's blocks
                n = min(seq.num_uncomputed_tokens, budget)
                if not bm.can_append(seq, n):
                    break
                self.waiting.popleft()
                out.block_copies += bm.append_slots(seq, n)
            else:
                # Prompt logprobs need the logits of every prompt position: no cached prefix may skip one.
                scores = seq.params.prompt_logprobs is not None and seq.is_unforked_parent
                hits = [] if scores else bm.find_cached_prefix(seq)
                n = min(seq.num_tokens - len(hits) * bm.block_size, budget)
                if not bm.can_allocate(seq, hits, n):
                    break
                self.waiting.popleft()
                bm.allocate(seq, hits, n)
                if seq.is_unforked_parent:
                    seq.request.num_cached_tokens = seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, n))
            num_live += seq.num_samples_to_draw
            budget -= n
            if scores:
                self.scoring.add(seq)
        if self.scoring:
            out.prompt_logprobs = [item for item in out.scheduled if item.seq in self.scoring]
            for item in out.prompt_logprobs:
                if item.seq.params.scores_only:
                    item.samples = False
        elif self.num_scheduler_steps > 1 and out.scheduled:
            self._extend_to_burst(out)
        return out

    def _extend_to_burst(self, out: SchedulerOutput) -> None:
        """Make a step of plain decodes a multi-step launch where ``multi_step.plan_burst`` allows, and the free
        blocks hold the KV slot of every draw each sequence keeps (all or nothing: short of blocks, it stays one
        step; a burst never preempts)."""
        steps, draws = plan_burst(out.scheduled, self.num_scheduler_steps, self.max_model_len)
        if steps == 1:
            return
        bm = self.block_manager
        # Each sequence already has the slot of its first token (its partly filled block made private, if shared).
        needed = sum(max(bm.blocks_for(item.seq.num_computed_tokens + n) - len(item.seq.block_table), 0)
                     for item, n in zip(out.scheduled, draws))
        if needed > bm.num_free_blocks:
            return
        for item, n in zip(out.scheduled, draws):
            copies = bm.append_slots(item.seq, n)
            assert not copies, "a burst's first slot was not made private when it was scheduled"
        out.num_steps, out.burst_draws = steps, draws
        self.num_multi_step_launches += 1

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- applying a step's results -----------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: StepResult, weight_version: int) -> list[Sequence]:
        """Apply a step's draws; returns the sequences that got tokens (or finished) this step."""
        self.advance(out)
        return self.apply_output(out, result, weight_version)

    def advance(self, out: SchedulerOutput) -> None:
        """Count a launched step's tokens as computed and its draws as pending. Async scheduling calls this at
        launch, so that the next step can be scheduled before this one's draws are applied."""
        if out.num_steps > 1:  # a burst of decodes: each computes its draws' tokens and draws as many
            for item, n in zip(out.scheduled, out.burst_draws):
                item.seq.num_computed_tokens += n
                item.seq.num_pending_tokens += n
            return
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                item.seq.num_pending_tokens += 1

    def apply_output(self, out: SchedulerOutput, result: StepResult, weight_version: int) -> list[Sequence]:
        """Apply an advanced step's draws; returns the sequences that got tokens (or finished). A sequence that
        ended while the step ran (async scheduling: an abort, or a stop in the step before) drops its draw."""
        if out.num_steps > 1:
            return self._apply_burst(out, result, weight_version)
        bm = self.block_manager
        touched: list[Sequence] = []
        token_ids, logprobs, failed = result.token_ids, result.logprobs, result.failed
        bs = bm.block_size
        finished = SequenceStatus.FINISHED_STOPPED  # and every status after it
        for i, (item, row) in enumerate(zip(out.scheduled, result.first_row)):
            seq = item.seq
            if item.samples:
                seq.num_pending_tokens -= 1
            if seq.status >= finished:
                continue
            if min(seq.num_computed_tokens, len(seq.token_ids)) // bs > seq.num_registered_blocks:
                bm.register_computed_blocks(seq)
            if row < 0:
                continue
            if seq.request.is_forked and seq.grammar_state is None and seq.stop_state is None \
                    and seq.top_logprobs is None and i not in failed:
                # The common draw (one sample; no grammar, stop string or top-N, nothing that can raise): the work
                # of _apply_token, inline, without the general path's try and fork check.
                seq.append_token(token_ids[row], weight_version)
                if seq.request.params.logprobs is not None:
                    seq.sampled_logprobs.append(None if logprobs is None else logprobs[row])
                self._check_stop(seq)
                touched.append(seq)
                continue
            targets = self._fork(seq) if seq.is_unforked_parent else (seq,)
            error = failed.get(i)
            for target in targets:
                if error is not None:
                    target.finish(SequenceStatus.FINISHED_ERROR, error)
                else:
                    try:  # an error here (a grammar's, say) ends this sample only
                        self._apply_token(target, token_ids[row], weight_version,
                                          None if logprobs is None else logprobs[row], result, row)
                    except Exception as e:
                        target.finish(SequenceStatus.FINISHED_ERROR, f"{type(e).__name__}: {e}")
                touched.append(target)
                row += 1
        if out.prompt_logprobs is not None:
            touched += self._update_prompt_logprobs(out.prompt_logprobs, result.prompt_logprobs)
        for seq in touched:
            if seq.status >= finished:
                self._remove(seq)
        return touched

    def _apply_burst(self, out: SchedulerOutput, result: StepResult, weight_version: int) -> list[Sequence]:
        """``apply_output`` for a multi-step launch: each sequence's draws in step order, up to the one that ends it
        (the rest are dropped). Only plain decodes burst (``multi_step.can_burst``): one row each, no grammar; the
        one fork is an n = 1 prompt's, whose first draw may be in the burst (a one-token last prompt chunk): its
        request must still be marked forked, or it would never count as finished."""
        bm = self.block_manager
        touched: list[Sequence] = []
        token_ids, logprobs, failed = result.token_ids, result.logprobs, result.failed
        stride = len(out.scheduled)
        finished = SequenceStatus.FINISHED_STOPPED  # and every status after it
        for i, (item, row, n) in enumerate(zip(out.scheduled, result.first_row, out.burst_draws)):
            seq = item.seq
            seq.num_pending_tokens -= n
            if seq.status >= finished:
                continue
            if seq.is_unforked_parent:
                self._fork(seq)  # n = 1 (can_burst): creates nothing
            touched.append(seq)
            if i in failed:
                seq.finish(SequenceStatus.FINISHED_ERROR, failed[i])
                continue
            try:  # an error here (a stop string's detokenizer, say) ends this sample only, as in apply_output
                for at in range(row, row + n * stride, stride):
                    self._apply_token(seq, token_ids[at], weight_version, None if logprobs is None else logprobs[at],
                                      result, at)
                    if seq.status >= finished:
                        break
            except Exception as e:
                seq.finish(SequenceStatus.FINISHED_ERROR, f"{type(e).__name__}: {e}")
            # After the tokens: the burst computed the KV of all but its last draw, so the blocks it filled hash
            # now (before the tokens, only its first one's would; a sample ending here would never offer the rest).
            if min(seq.num_computed_tokens, len(seq.token_ids)) // bm.block_size > seq.num_registered_blocks:
                bm.register_computed_blocks(seq)
        for seq in touched:
            if seq.status >= finished:
                self._remove(seq)
        return touched

    def _update_prompt_logprobs(self, items: list[ScheduledSeq], chunks: list | None) -> list[Sequence]:
        """Store the positions scored this step; a request whose prompt is now computed has all of them. Returns
        the samples of score-only requests, which end here."""
        ended = []
        for i, item in enumerate(items):
            seq, request = item.seq, item.seq.request
            if seq.status == SequenceStatus.FINISHED_ABORTED:  # aborted after this step was scheduled: gone
                continue
            if chunks is not None:
                request.add_prompt_logprobs(chunks[i])
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                continue
            self.scoring.discard(seq)
            request.complete_prompt_logprobs()
            if seq.params.scores_only:
                self._add_finished_samples(request, SequenceStatus.FINISHED_LENGTH)
                seq.finish(SequenceStatus.FINISHED_LENGTH)
                ended += request.seqs
        return ended

    def _add_finished_samples(self, request: Request, status: SequenceStatus) -> None:
        """A request ending before it forked: its other samples are created finished (and empty), so that each
        gets a finish reason."""
        parent = request.seqs[0]
        request.seqs = [parent] + [Sequence(request, i, list(parent.token_ids)) for i in range(1, request.params.n)]
        request.is_forked = True
        for child in request.seqs[1:]:
            child.finish(status)

    def _apply_token(self, seq: Sequence, token_id: int, weight_version: int, logprob, result: StepResult,
                     row: int) -> None:
        # apply_output does this inline for the common draw: a change here belongs there too (a test compares them).
        seq.append_token(token_id, weight_version)
        if seq.params.logprobs is not None:
            seq.sampled_logprobs.append(logprob)
            if seq.top_logprobs is not None:
                seq.top_logprobs.append(result.top_ids, result.top_logprobs, row)
        state = seq.grammar_state
        if state is not None and not state.accept(token_id):
            seq.finish(SequenceStatus.FINISHED_ERROR, state.error)
        else:
            self._check_stop(seq)

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Split a parent whose prompt is done into its n samples. Those beyond ``max_num_seqs`` running
        sequences wait at the head of the queue (their first token drawn, the prompt's blocks shared)."""
        request = parent.request
        if request.params.n == 1:  # nothing to create; the parent may be waiting (async: preempted, draw in flight)
            request.is_forked = True
            return [parent]
        children = []
        for index in range(1, request.params.n):
            child = Sequence(request, index, list(parent.token_ids))
            if parent.grammar_state is not None:
                child.grammar_state = parent.grammar_state.copy()  # still at the start: no token accepted
            if request.stop_strings is not None:
                child.stop_state = request.stop_strings.new_state()
            self.block_manager.fork(parent, child)
            children.append(child)
        request.seqs = [parent] + children
        request.is_forked = True
        room = max(self.max_num_seqs - len(self.running), 0)  # the parent already runs
        running, waiting = children[:room], children[room:]
        for child in running:
            child.status = SequenceStatus.RUNNING
        at = self.running.index(parent) + 1
        self.running[at:at] = running
        self.waiting.extendleft(reversed(waiting))  # in sample order, ahead of newer requests
        return [parent] + children

    def _check_stop(self, seq: Sequence) -> None:
        params = seq.request.params
        token = seq.token_ids[-1]
        num_tokens = len(seq.token_ids)
        num_out = num_tokens - seq.num_prompt_tokens
        if num_out >= params.min_tokens:
            if token in self.eos_token_ids and not params.ignore_eos:
                seq.finish(SequenceStatus.FINISHED_STOPPED, None)
                return
            if params.stop_token_ids and token in params.stop_token_ids:
                seq.finish(SequenceStatus.FINISHED_STOPPED, token)
                return
        if seq.stop_state is not None:  # in this step: the sample holds no KV block past its stop string
            stop = seq.stop_state.add(token, can_stop=num_out > params.min_tokens)
            if stop is not None:
                seq.finish(SequenceStatus.FINISHED_STOPPED, stop)
                return
        if seq.grammar_state is not None and seq.grammar_state.is_terminated():
            seq.finish(SequenceStatus.FINISHED_STOPPED)  # the grammar is complete: only EOS could follow
            return
        if num_out >= params.max_tokens or num_tokens >= self.max_model_len:
            seq.finish(SequenceStatus.FINISHED_LENGTH)

    # -- removal (finish, abort) -------------------------------------------------------------------
    def _remove(self, seq: Sequence) -> None:
        self.scoring.discard(seq)
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)

    def finish_seq(self, seq: Sequence, status: SequenceStatus, stop_reason=None) -> None:
        """End a live sequence from outside a step (an abort)."""
        if seq.status.is_finished:
            return
        seq.finish(status, stop_reason)
        self._remove(seq)

    def abort_request(self, request: Request, status: SequenceStatus = SequenceStatus.FINISHED_ABORTED
                      ) -> list[Sequence]:
        """End every live sequence of a request; a request still computing its prompt ends with all of its
        samples (they are created empty, so that each gets a finish reason)."""
        if not request.is_forked:
            self._add_finished_samples(request, status)
        ended = []
        for seq in request.seqs:
            if not seq.status.is_finished:
                self.finish_seq(seq, status)
            ended.append(seq)
        return ended
