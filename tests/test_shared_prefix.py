"""Decode rows that share a prefix: the plan (``metadata.plan_shared_prefixes``) and what the model runner hands
the attention backend. The kernels that read a shared prefix once are tested in test_triton_attention.py."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import assert_no_leak
from rlserve import LLM, SamplingParams
from rlserve.attention.metadata import plan_shared_prefixes

BS = 16


def plan(tables, seq_lens, max_members=8, min_blocks=2):
    return plan_shared_prefixes(tables, seq_lens, BS, max_members, min_blocks)


def test_samples_of_two_prompts_form_a_group_each():
    """Eight samples of a 3-block prompt, then three of another whose tables share its first two blocks (a cached
    system prompt): the second prompt's samples start their own group instead of shrinking the first's."""
    first = [[1, 2, 3, 100 + i, 200 + i] for i in range(8)]
    second = [[1, 2, 7, 300 + i] for i in range(3)]
    prefix_lens, sizes = plan(first + second, [70] * 8 + [60] * 3)
    assert prefix_lens == [3 * BS] * 8 + [3 * BS] * 3
    assert sizes == [8] + [0] * 7 + [3, 0, 0]


def test_group_size_is_capped_and_the_rest_group_again():
    tables = [[5, 6, 7, 50 + i] for i in range(10)]
    prefix_lens, sizes = plan(tables, [60] * 10, max_members=4)
    assert sizes == [4, 0, 0, 0, 4, 0, 0, 0, 2, 0]
    assert prefix_lens == [3 * BS] * 10


def test_a_lone_row_and_a_short_share_stay_out():
    # rows 0-1 share one block (under min_blocks), row 2 shares nothing, rows 3-4 share two: one group
    tables = [[1, 9, 9], [1, 8, 8], [4, 4, 4], [5, 6, 1], [5, 6, 2]]
    prefix_lens, sizes = plan(tables, [40] * 5)
    assert prefix_lens == [0, 0, 0, 2 * BS, 2 * BS] and sizes == [0, 0, 0, 2, 0]
    assert plan([[1, 2, 3], [1, 2, 3]], [40, 40], min_blocks=3) is None  # 40 tokens: two full blocks only
    assert plan([[1, 2, 3]], [40]) is None
    assert plan([], []) is None


def test_the_shared_blocks_are_those_below_every_members_context():
    """Identical tables, but the shortest member's context ends inside block 2 (or with it, a full block that holds
    its newest token, still shared, as copy-on-write would have split a block being written): blocks 0-1."""
    tables = [[1, 2, 3, 4]] * 3
    assert plan(tables, [64, 2 * BS + 5, 64]) == ([2 * BS] * 3, [3, 0, 0])
    assert plan(tables, [64, 2 * BS, 64]) == ([2 * BS] * 3, [3, 0, 0])
    # The first two rows set the group's blocks; a later row that shares fewer starts anew.
    assert plan(tables[:2] + [[1, 2, 9, 9]], [64, 64, 64]) == ([4 * BS, 4 * BS, 0], [2, 0, 0])


@pytest.fixture
def planning_backend(monkeypatch):
    """The CPU reference backend, announced as one with a shared-prefix pass (tiles of 64 rows, from 2 decode rows):
    the runner plans groups for it, and it ignores them (it reads every context whole)."""
    from rlserve.engine import runner

    def get_backend(name, device):
        return dataclasses.replace(real(name, device), shared_prefix_rows=64,
                                   shared_prefix_min_batch=lambda num_kv_heads, device: 2)
    real = runner.get_backend
    monkeypatch.setattr(runner, "get_backend", get_backend)


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_runner_hands_the_plan_to_the_backend(tiny_model, num_scheduler_steps, monkeypatch, planning_backend):
    """Every decode step's metadata carries the groups of the samples of each prompt (through the packed upload,
    beside the async draws and a multi-step launch), and the tokens are those of an engine that plans none."""
    prompts = [list(range(10, 60)), list(range(70, 110))]  # 50 and 40 tokens: 3 and 2 full blocks at BS 16
    params = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=8, min_tokens=8, logprobs=0)
    config = dict(device="cpu", block_size=BS, num_scheduler_steps=num_scheduler_steps, async_scheduling=True)
    want = [[c.token_ids for c in o.outputs]
            for o in LLM(tiny_model, shared_prefix_min_tokens=0, **config).generate(prompts, params)]

    llm = LLM(tiny_model, shared_prefix_min_tokens=BS, **config)
    runner = llm.engine.runner
    assert runner.max_shared_prefix_members > 1
    seen, ahead = [], []
    device_inputs = runner._device_inputs

    def recording(step, *args, **kwargs):
        ids, pos, meta, samples = device_inputs(step, *args, **kwargs)
        if meta.num_prefills == 0:
            seen.append(dataclasses.replace(meta))
            ahead.append(bool(step.ahead_index))
        return ids, pos, meta, samples
    monkeypatch.setattr(runner, "_device_inputs", recording)

    got = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    assert got == want
    planned = [tuple(t.tolist() for t in m.shared_prefixes) for m in seen if m.shared_prefixes is not None]
    assert planned and all(p == ([3 * BS] * 3 + [2 * BS] * 3, [3, 0, 0, 3, 0, 0]) for p in planned), planned
    assert len(planned) == len(seen)  # every decode step of the six samples
    assert any(ahead)  # some of them took their tokens from the draws still on the device
    assert_no_leak(llm)
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_the_threshold_is_validated_and_zero_turns_planning_off(tiny_model, planning_backend):
    with pytest.raises(ValueError, match="shared_prefix_min_tokens must be >= 0"):
        LLM(tiny_model, device="cpu", shared_prefix_min_tokens=-1)
    on = LLM(tiny_model, device="cpu", block_size=BS, shared_prefix_min_tokens=3 * BS).engine.runner
    layer = on.model.attention_layers[0]
    assert on.max_shared_prefix_members == 64 // (layer.num_heads // layer.num_kv_heads) > 1
    assert on.shared_prefix_min_blocks == 3 and on.shared_prefix_min_batch == 2
    llm = LLM(tiny_model, device="cpu", block_size=BS, shared_prefix_min_tokens=0)
    runner = llm.engine.runner
    assert runner.max_shared_prefix_members == 0 and runner.shared_prefix_min_batch == 0
    plans, build_step = [], runner.build_step

    def recording(items, block_copies):
        step = build_step(items, block_copies)
        plans.append(step.shared_group_sizes)
        return step
    runner.build_step = recording
    assert llm.generate([list(range(10, 60))], SamplingParams(n=3, max_tokens=3))[0].outputs[0].token_ids
    assert plans and not any(plans)
