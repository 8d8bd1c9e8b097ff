"""The scheduler alone, driven by fake model outputs: chunked prefill, decode, fork, preemption, admission."""

from __future__ import annotations

import pytest

from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.scheduler import Scheduler, StepResult
from rlserve.engine.sequence import Request, SequenceStatus
from rlserve.sampling import SamplingParams

EOS = 99


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=16, max_len=128):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_seqs, budget, max_len, (EOS,))


def add(s, rid, prompt_len, first=1, **params):
    params.setdefault("max_tokens", 8)
    req = Request(rid, list(range(first, first + prompt_len)), SamplingParams(**params), seed=0)
    s.check_fits(prompt_len, req.params.max_tokens)
    s.add_request(req)
    return req


def run_step(s, token=7):
    """Fake model output: every sequence that samples draws ``token``."""
    out = s.schedule()
    tokens, first_row = [], []
    for item in out.scheduled:
        first_row.append(len(tokens) if item.samples else -1)
        if item.samples:
            tokens += [token] * item.seq.num_samples_to_draw
    s.update_from_output(out, StepResult(tokens, first_row), weight_version=0)
    return out


def test_chunked_prefill_then_decode():
    s = make_scheduler(budget=8)
    req = add(s, "a", 20, max_tokens=3)
    sizes = []
    while s.num_unfinished:
        out = run_step(s)
        sizes.append([item.num_new_tokens for item in out.scheduled])
    assert sizes == [[8], [8], [4], [1], [1]]
    assert req.seqs[0].output_token_ids == [7, 7, 7]
    assert req.seqs[0].status == SequenceStatus.FINISHED_LENGTH
    s.block_manager.check_invariants()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_prefill_and_decode_share_a_step():
    s = make_scheduler(budget=16)
    add(s, "a", 4, max_tokens=5)
    run_step(s)
    add(s, "b", 10, first=50)  # no common prefix with "a"
    out = s.schedule()
    assert [item.num_new_tokens for item in out.scheduled] == [1, 10]


def test_fork_n_samples_share_prompt_blocks():
    s = make_scheduler(block_size=4)
    req = add(s, "a", 10, n=4, max_tokens=2)
    run_step(s)
    assert req.is_forked and len(req.seqs) == 4
    tables = [seq.block_table for seq in req.seqs]
    assert all(t == tables[0] for t in tables)  # three blocks, shared by all four samples
    out = s.schedule()
    assert len(out.block_copies) == 3  # the partial last block: copied for all but the last writer
    s.block_manager.check_invariants()


def test_preemption_by_recompute_when_blocks_run_out():
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = add(s, "a", 8, max_tokens=8)
    b = add(s, "b", 8, max_tokens=8)
    preempted = 0
    while s.num_unfinished:
        preempted += run_step(s).num_preempted
        s.block_manager.check_invariants()
    assert preempted >= 1
    for req in (a, b):
        assert req.seqs[0].output_token_ids == [7] * 8
    assert s.block_manager.num_free_blocks == 6


def test_refuses_what_can_never_fit():
    s = make_scheduler(num_blocks=4, block_size=4, max_len=100)
    with pytest.raises(ValueError, match="max_model_len"):
        s.check_fits(100, 1)
    with pytest.raises(ValueError, match="max_tokens"):
        s.check_fits(50, 60)
    with pytest.raises(ValueError, match="KV cache capacity"):
        s.check_fits(10, 10)
    assert s.check_fits(4, 12) == 12
    assert s.check_fits(4, None) == 12  # no max_tokens: as far as the cache allows


def test_max_num_seqs_counts_samples_of_a_parent():
    s = make_scheduler(max_seqs=4)
    add(s, "a", 4, n=3)
    add(s, "b", 4, n=3)
    out = s.schedule()
    assert len(out.scheduled) == 1


def test_stop_on_eos_and_stop_ids_respects_min_tokens():
    s = make_scheduler()
    r1 = add(s, "eos", 4, max_tokens=8)
    r2 = add(s, "min", 4, max_tokens=8, min_tokens=2)
    r3 = add(s, "ign", 4, max_tokens=2, ignore_eos=True)
    run_step(s, token=EOS)
    r4 = add(s, "ids", 4, first=20, max_tokens=8, stop_token_ids=[5])
    assert r1.seqs[0].status == SequenceStatus.FINISHED_STOPPED
    assert r2.seqs[0].status == SequenceStatus.RUNNING  # EOS before min_tokens does not stop
    assert r3.seqs[0].status == SequenceStatus.RUNNING
    run_step(s, token=5)
    run_step(s, token=5)
    assert r4.seqs[0].status == SequenceStatus.FINISHED_STOPPED and r4.seqs[0].stop_reason == 5
    assert r2.seqs[0].status == SequenceStatus.RUNNING
    assert r3.seqs[0].status == SequenceStatus.FINISHED_LENGTH
    run_step(s, token=EOS)  # r2 has 3 tokens now, past min_tokens
    assert r2.seqs[0].status == SequenceStatus.FINISHED_STOPPED


def test_abort_unforked_request_reports_every_sample():
    s = make_scheduler()
    req = add(s, "a", 4, n=3)
    s.schedule()
    ended = s.abort_request(req)
    assert [seq.status for seq in ended] == [SequenceStatus.FINISHED_ABORTED] * 3
    assert s.num_unfinished == 0
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_prompt_logprobs_skip_the_prefix_cache_and_score_only_draws_nothing():
    s = make_scheduler(block_size=4, budget=8)
    add(s, "warm", 12, max_tokens=1)
    while s.num_unfinished:
        run_step(s)
    scored = add(s, "a", 12, n=3, max_tokens=0, prompt_logprobs=2)  # the same prompt: its blocks are cached
    steps = []
    while s.num_unfinished:
        steps.append(run_step(s))
    assert scored.num_cached_tokens == 0
    assert [[(i.num_new_tokens, i.samples) for i in out.prompt_logprobs] for out in steps] == [[(8, False)],
                                                                                               [(4, False)]]
    assert [(seq.status, seq.output_token_ids) for seq in scored.seqs] == [(SequenceStatus.FINISHED_LENGTH, [])] * 3
    assert scored.prompt_logprobs is not None and not s.scoring
    plain = add(s, "b", 12, max_tokens=1)  # without prompt logprobs, the cache serves it again
    out = s.schedule()
    assert out.prompt_logprobs is None and plain.num_cached_tokens == 8
    s.block_manager.check_invariants()


def test_score_only_prompt_may_fill_the_context():
    s = make_scheduler(num_blocks=8, block_size=4, max_len=32)
    assert s.check_fits(32, 0) == 0
    with pytest.raises(ValueError, match="the prompt must fit in both"):
        s.check_fits(33, 0)
    with pytest.raises(ValueError, match="must be shorter than max_model_len"):
        s.check_fits(32, 1)


def test_n_larger_than_max_num_seqs_runs_in_parts():
    """n = 10 on a 4-sequence scheduler: all ten samples draw their first token from the prompt, four run,
    the other six wait (sharing the prompt's blocks) and start as running ones finish."""
    s = make_scheduler(max_seqs=4, block_size=4)
    req = add(s, "a", 6, n=10, max_tokens=3)
    run_step(s)  # the prompt: the fork
    assert len(req.seqs) == 10 and all(len(seq.output_token_ids) == 1 for seq in req.seqs)
    assert len(s.running) == 4 and len(s.waiting) == 6
    assert all(seq.block_table == req.seqs[0].block_table for seq in req.seqs)
    while s.num_unfinished:
        out = run_step(s)
        assert len(out.scheduled) <= 4 and len(s.running) <= 4
        s.block_manager.check_invariants()
    assert [seq.output_token_ids for seq in req.seqs] == [[7, 7, 7]] * 10
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_waiting_samples_of_a_large_n_go_before_newer_requests():
    s = make_scheduler(max_seqs=2)
    big = add(s, "big", 4, n=5, max_tokens=2)
    run_step(s)
    later = add(s, "later", 4, first=40, max_tokens=2)
    started = set()
    for _ in range(50):
        if not s.num_unfinished:
            break
        out = run_step(s)
        assert len(s.running) <= 2
        ids = {item.seq.request.request_id for item in out.scheduled}
        if "later" in ids:
            assert all(seq.status.is_finished or seq in s.running for seq in big.seqs)  # all started first
        started |= ids
    assert not s.num_unfinished
    assert all(seq.status == SequenceStatus.FINISHED_LENGTH for seq in big.seqs + later.seqs)


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_never_runs_more_than_max_num_seqs(seed):
    """Random prompts, n, lengths and EOS draws on a small cache (preemption) and a small budget (chunked
    prefill): at most max_num_seqs sequences run or are scheduled in any step, block accounting holds, and
    every request ends with each of its samples."""
    import random
    rng = random.Random(seed)
    max_seqs = rng.choice([1, 2, 3, 5, 8])
    s = make_scheduler(num_blocks=rng.choice([12, 24, 64]), block_size=4, budget=rng.choice([3, 6, 16, 64]),
                       max_seqs=max_seqs, max_len=64)
    requests = []
    for step in range(400):
        if len(requests) < 12 and rng.random() < 0.3:
            prompt_len = rng.randrange(1, 20)
            max_tokens = rng.randrange(1, 12)
            try:
                requests.append(add(s, f"r{len(requests)}", prompt_len, first=rng.randrange(0, 50),
                                    n=rng.choice([1, 2, 3, 7, 20]), max_tokens=max_tokens))
            except ValueError:  # larger than the whole cache: refused at admission
                pass
        if not s.num_unfinished:
            continue
        out = run_step(s, token=EOS if rng.random() < 0.05 else 7)
        assert len(out.scheduled) <= max_seqs and len(s.running) <= max_seqs
        s.block_manager.check_invariants()
    for _ in range(2000):
        if not s.num_unfinished:
            break
        out = run_step(s)
        assert len(out.scheduled) <= max_seqs and len(s.running) <= max_seqs
    assert not s.num_unfinished, "the scheduler stopped making progress"
    for req in requests:
        assert len(req.seqs) == req.params.n and req.is_finished
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


@pytest.mark.parametrize("module", ["rlserve.engine.scheduler", "rlserve.engine.kv_cache", "rlserve.engine.messages",
                                    "rlserve.engine.output_processor", "rlserve.engine.validation"])
def test_module_imports_no_torch(module):
    """The scheduler and block manager are pure CPU logic; the messages and the output processor run in the API
    process, which must not pay for torch because of them."""
    import subprocess
    import sys
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_a_failed_draw_after_the_fork_ends_that_sample_alone():
    """A decode draw the runner reports failed (StepResult.failed) ends its sample with the error -- also on the
    common one-sample path of apply_output -- and its sibling draws on."""
    s = make_scheduler()
    req = add(s, "a", 5, n=2, max_tokens=8, logprobs=0)
    run_step(s)  # the prompt, the fork and both samples' first token
    out = s.schedule()
    s.advance(out)
    rows = list(range(len(out.scheduled)))
    failed_index = next(i for i, item in enumerate(out.scheduled) if item.seq.sample_index == 0)
    s.apply_output(out, StepResult([7] * len(rows), rows, logprobs=[-0.5] * len(rows),
                                   failed={failed_index: "boom"}), weight_version=3)
    first, second = req.seqs
    assert (first.status, first.stop_reason) == (SequenceStatus.FINISHED_ERROR, "boom")
    assert first.num_output_tokens == 1 and first.sampled_logprobs == [None]  # nothing drawn after the fork's
    assert second.status == SequenceStatus.RUNNING
    assert second.output_token_ids == [7, 7] and second.sampled_logprobs == [None, -0.5]
    assert second.weight_versions == [0, 3]
    assert first not in s.running and [x.num_pending_tokens for x in req.seqs] == [0, 0]
