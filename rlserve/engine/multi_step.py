"""Multi-step decoding's one rule: which steps may run several decode steps in one launch, and how many
(``EngineConfig.num_scheduler_steps``, vLLM V0's ``--num-scheduler-steps``).

A burst of K steps runs on the device back to back: step k's drawn tokens are step k+1's inputs, its positions
and context lengths one more, its KV slots in blocks the scheduler allocated for all K tokens before the launch.
The host then applies K tokens per sequence at once. What it saves is the host's work per step (schedule, build
and upload inputs, sampling inputs, the device-to-host wait, apply) on all but one step of K; on a small model that
work is as long as the device's step (BENCHMARKS.md), so the device idles, or with async scheduling the host
bounds the step.

Draws are counter-based (a row's seed is a hash of its stream and output position, ``sampling_batch.py``), so a
burst draws exactly the tokens the same steps would one at a time. A sequence may join a burst only when nothing
of its next K draws depends on the host in between (``can_burst``):

- its request has forked into its samples (a prompt's first draw forks it on the host), or has one sample: an
  n = 1 prompt's first draw may still be in flight (async scheduling; steps are applied in launch order, so its
  empty fork is done first) or be the burst's own first draw (a one-token last prompt chunk, e.g. after a
  prefix-cache hit: ``Scheduler._apply_burst`` forks the request then);
- no grammar (the next step's allowed-token mask needs the draw), no repetition / presence / frequency penalty
  (counts updated per draw), ``min_tokens`` already reached (stop tokens are masked until then).

Top-N logprobs burst: each step's [S, N] rows come back stacked like its draws.

And a step bursts only when every sequence in it is such a decode and no prompt's logprobs are scored in it: one
sequence that is not holds the whole step to one decode step (``plan_burst``). K is cut so that no row's position
passes ``max_model_len``. A sequence with fewer tokens left to its ``max_tokens`` keeps that many draws: its row
runs the rest of the burst for nothing, its KV not written and no block allocated for it, so the sequences near
their end in a continuous batch do not cut the burst of the others. One that stops by content (EOS, a stop token,
a stop string) mid-burst computes the rest of the burst for nothing too; its later draws are dropped when the burst
is applied, and the KV slots they wrote go back with its blocks.

Requests waiting for room do not stop a burst: a sample that ends early in one frees its room at the burst's end,
at most K - 1 steps late, where stopping every burst while anything waits would lose them all whenever a batch
holds more samples than ``max_num_seqs`` (vLLM V0's multi-step did the same). Torch-free: the scheduler reads it.
"""

from __future__ import annotations


def can_burst(seq, num_output_tokens: int) -> bool:
    """May ``seq`` draw several tokens without the host between them? ``num_output_tokens``: its output length
    as the scheduler sees it (draws in flight included)."""
    p = seq.request.params
    return ((seq.request.is_forked or p.n == 1) and seq.grammar_state is None and not p.uses_penalties
            and p.min_tokens <= num_output_tokens)


def plan_burst(scheduled, max_steps: int, max_model_len: int) -> tuple[int, list[int]]:
    """How many decode steps a scheduled step (its ``ScheduledSeq`` items) may run in one launch, and how many
    draws each item keeps: (1, []) unless every item is a one-token decode that draws and ``can_burst``. K is
    ``max_steps`` cut so that every row's positions stay inside ``max_model_len`` (a launch cannot drop a row
    half-way), and to the most draws any item has left; an item with fewer draws left (``max_tokens``) keeps
    that many, its later steps computed for nothing, their KV not written (``ModelRunner._launch_burst``)."""
    if max_steps == 1:
        return 1, []
    steps, left = max_steps, []
    for item in scheduled:
        seq = item.seq
        if item.num_new_tokens != 1 or not item.samples:
            return 1, []
        num_tokens = seq.num_scheduled_tokens
        num_out = num_tokens - seq.num_prompt_tokens
        if not can_burst(seq, num_out):
            return 1, []
        steps = min(steps, max_model_len - num_tokens)
        left.append(seq.params.max_tokens - num_out)
    steps = min(steps, max(left, default=1))
    if steps <= 1:
        return 1, []
    return steps, [min(steps, n) for n in left]
