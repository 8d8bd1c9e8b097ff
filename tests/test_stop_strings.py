"""Stop strings are found in the engine, where tokens are made: the sample ends in the step that drew the token
completing one (its KV blocks freed then), its token ids end at that token, its text is cut as vLLM cuts it.

First with a fake tokenizer of multi-character tokens (a stop string across tokens, inside a token), driving the
scheduler alone with fake model outputs; then on the tiny model, offline.
"""

from __future__ import annotations

import pytest

from conftest import assert_no_leak
from rlserve import SamplingParams
from rlserve.engine.kv_cache import BlockManager
from rlserve.engine.scheduler import Scheduler, StepResult
from rlserve.engine.sequence import Request, SequenceStatus
from rlserve.engine.stop_strings import StopStrings

EOS = 0
PIECES = {0: "", 1: "Hel", 2: "lo", 3: " wor", 4: "ld!", 5: " ", 6: "x", 7: "END", 8: "y"}


class PieceTokenizer:
    """Each id is a fixed string (ids 0 is special: skipped)."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOS))


def state_after(tokens, **params):
    """Feed ``tokens`` to a sample's stop state; (tokens consumed up to the stop, stop string, text)."""
    params = SamplingParams(max_tokens=64, **params)
    state = StopStrings(PieceTokenizer(), [6], params).new_state()
    for i, t in enumerate(tokens):
        stop = state.add(t, can_stop=i + 1 > params.min_tokens)
        if stop is not None:
            return i + 1, stop, state.text
    return len(tokens), None, state.text


def test_a_stop_string_completed_across_two_tokens():
    assert state_after([1, 2, 3, 4], stop=["lo wor"]) == (3, "lo wor", "Hel")


def test_a_stop_string_inside_a_token_ends_the_sample_at_that_token_and_cuts_the_text():
    assert state_after([1, 2, 3, 4], stop=["wo"]) == (3, "wo", "Hello ")
    assert state_after([1, 2, 3, 4], stop=["el"]) == (1, "el", "H")


def test_include_stop_str_in_output_keeps_the_stop_string_not_what_follows():
    assert state_after([1, 2, 3, 4], stop=["wo"], include_stop_str_in_output=True) == (3, "wo", "Hello wo")


def test_the_first_stop_string_in_list_order_wins_and_min_tokens_hold_them_off():
    assert state_after([1, 2, 3, 4], stop=["ld", "o w"]) == (3, "o w", "Hell")
    assert state_after([1, 2], stop=["Hello", "ell"]) == (2, "Hello", "")  # vLLM's rule: list order
    assert state_after([1, 2], stop=["ell", "Hello"]) == (2, "ell", "H")
    assert state_after([1, 2, 3, 4], stop=["lo"], min_tokens=2) == (4, None, "Hello world!")  # found at 2: too soon
    # a longer stop in the list must not widen the search back into text min_tokens held off
    assert state_after([1, 2, 3, 4], stop=["lo", "a much longer stop"], min_tokens=2) == (4, None, "Hello world!")
    assert state_after([1, 2, 3, 2], stop=["lo"], min_tokens=2) == (4, "lo", "Hello wor")


# -- in the scheduler: the sample ends in the step that completed its stop string --------------------------
SCRIPTS = {0: [1, 2, 3, 4, 5, 6, 6, 6, 6, 6], 1: [6, 8, 6, 1, 2, 5, 7, 6, 6, 6]}  # sample -> its draws


def scripted_step(s: Scheduler) -> None:
    """Fake model output: sample i draws SCRIPTS[i][number of tokens it has]."""
    out = s.schedule()
    tokens, first_row = [], []
    for item in out.scheduled:
        first_row.append(len(tokens) if item.samples else -1)
        if item.samples:
            seq = item.seq
            indices = range(seq.num_samples_to_draw) if seq.is_unforked_parent else [seq.sample_index]
            tokens += [SCRIPTS[i][seq.num_output_tokens] for i in indices]
    s.update_from_output(out, StepResult(tokens, first_row), weight_version=0)


def test_n_samples_stop_at_their_own_points_in_the_step_that_completes_the_stop():
    bm = BlockManager(64, 4)
    s = Scheduler(bm, 16, 32, 128, (EOS,))
    params = SamplingParams(n=2, max_tokens=10, stop=["lo w", "END"])
    prompt = [6, 6, 6]
    request = Request("r", prompt, params, seed=0, stop_strings=StopStrings(PieceTokenizer(), prompt, params))
    s.add_request(request)
    steps = 0
    ended_at = {}
    while s.num_unfinished:
        scripted_step(s)
        steps += 1
        for seq in request.seqs:
            if seq.status.is_finished:
                ended_at.setdefault(seq.sample_index, steps)
    first, second = request.seqs
    assert first.output_token_ids == [1, 2, 3] and first.stop_reason == "lo w"  # "lo" + " wor"
    assert first.status == SequenceStatus.FINISHED_STOPPED and first.stop_state.text == "Hel"
    assert second.output_token_ids == [6, 8, 6, 1, 2, 5, 7] and second.stop_reason == "END"
    assert second.stop_state.text == "xyxHello "
    assert ended_at == {0: 3, 1: 7}  # nothing drawn past either stop
    assert steps == 7 and bm.num_free_blocks == bm.num_blocks


# -- on the tiny model (byte tokenizer), offline ------------------------------------------------------------
def test_sampled_n_gt_1_each_sample_stops_at_its_first_stop_and_the_engine_no_later(llm):
    params = SamplingParams(temperature=1.0, seed=11, n=4, max_tokens=40, ignore_eos=True)
    full = llm.generate([[1, 2, 3]], params)[0].outputs

    def printable(tokens, start):
        return next(chr(t) for t in tokens[start:] if 33 <= t < 127)
    stops = [printable(full[0].token_ids, 2), printable(full[1].token_ids, 8)]
    steps_before = llm.stats()["num_steps"]
    out = llm.generate([[1, 2, 3]], params.clone(stop=stops))[0].outputs
    steps = llm.stats()["num_steps"] - steps_before
    for whole, cut in zip(full, out):
        # Byte tokens: an ASCII stop string of one character is completed by the first token of that byte.
        end = next((i + 1 for i, t in enumerate(whole.token_ids) if chr(t) in stops), None)
        if end is None:
            assert cut.finish_reason == "length" and cut.token_ids == whole.token_ids
            continue
        stop = chr(whole.token_ids[end - 1])
        assert cut.finish_reason == "stop" and cut.stop_reason == stop, cut
        assert cut.token_ids == whole.token_ids[:end]
        assert cut.text == llm.tokenizer.decode(whole.token_ids[:end - 1])
    assert len({len(c.token_ids) for c in out}) > 1, out  # different stop points
    assert steps == max(len(c.token_ids) for c in out)  # the engine drew nothing past the last stop
    assert_no_leak(llm)


@pytest.mark.parametrize("include", [False, True])
def test_greedy_stop_cuts_text_like_vllm(llm, include):
    greedy = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    full = llm.generate(["stop here"], greedy)[0].outputs[0]
    # Two printable characters (a replacement character is held back until the next token tells what it is).
    stop = next(full.text[i:i + 2] for i in range(2, len(full.text)) if full.text[i:i + 2].isascii()
                and full.text[i:i + 2].isprintable() and len(full.text[i:i + 2]) == 2)
    at = full.text.find(stop)
    out = llm.generate(["stop here"], greedy.clone(min_tokens=0, stop=[stop],
                                                     include_stop_str_in_output=include))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:at + len(stop)] if include else out.text == full.text[:at]
    end = next(k for k in range(1, len(full.token_ids) + 1) if stop in llm.tokenizer.decode(full.token_ids[:k]))
    assert out.token_ids == full.token_ids[:end]  # ends at the token that completed the stop string
