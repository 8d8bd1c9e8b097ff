"""Async scheduling's one rule: which work may run ahead of the host (``EngineConfig.async_scheduling``).

With async scheduling the engine launches step t+1 before it applies step t's draws: a sequence decoding in step
t decodes again in step t+1, its input token fed from step t's draw on the device (``ModelRunner``), while the
host copies step t's draws back and applies them (``EngineCore``). Everything the host must know of a draw
before it can build the next step makes that step a synchronous one. This module says which, and nothing else
decides it. Torch-free: the scheduler reads it.

A step must be applied before the next is scheduled (``must_apply_first``) when it

- computes prompt logprobs (the scheduler's scoring bookkeeping follows the applied chunks);
- draws the first tokens of a prompt with ``n`` > 1: the request forks into its ``n`` samples when that draw is
  applied, and the next step cannot schedule samples that do not exist yet. A prompt with n = 1 runs ahead: its
  parent is its only sample, scheduled again with its first draw in flight like any decode (the fork, when the
  draw is applied, creates nothing), so that under continuous arrivals of n = 1 requests the steps that finish a
  prefill overlap too;
- draws for a guided sequence: the next step's allowed-token mask needs the grammar advanced by the draw.

Penalties need no host: the next step counts a draw still in flight from the device (``penalty_state.py``).

A sequence whose draw in flight is its last by length (``max_tokens`` or ``max_model_len``) is not scheduled
again (``can_run_ahead``): its batch in step t+1 is the synchronous one. One that stops by content (EOS, a stop
token, a stop string) cannot be known in advance: it computes one extra token in step t+1, which is dropped
when step t's draws are applied; the KV slot it wrote goes back with the sequence's blocks.
"""

from __future__ import annotations


def can_run_ahead(seq, max_model_len: int) -> bool:
    """May ``seq``, with a draw not applied yet, be scheduled again? Not when that draw ends it by length."""
    num_tokens = seq.num_scheduled_tokens
    return num_tokens - seq.num_prompt_tokens < seq.params.max_tokens and num_tokens < max_model_len


def must_apply_first(sched) -> bool:
    """Must this launched step's draws be applied before the next step is scheduled? (A ``SchedulerOutput``.)"""
    if sched.prompt_logprobs is not None:
        return True
    for item in sched.scheduled:
        if item.samples:
            seq = item.seq
            if seq.grammar_state is not None or (seq.is_unforked_parent and seq.request.params.n > 1):
                return True
    return False
