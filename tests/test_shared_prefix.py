"""Which decoding sequences share a prefix (runner.shared_prefixes) and what the runner uploads for them.

The kernel side (one read of the shared blocks per group, then each member's own keys from that state) is
tested against the reference in test_triton_attention.py; the engine end to end on a GPU in test_gpu.py."""

from __future__ import annotations

import pytest

from rlserve.engine.runner import StepInput, _prefix_group_lists, shared_prefixes

BS = 16


def test_forked_samples_share_their_full_prompt_blocks():
    prompt = [7, 3, 9, 4, 11]  # 5 blocks; samples of a 70-token prompt own their last (partial, copied) block
    tables = [prompt[:4] + [20 + i, 30 + i] for i in range(3)] + [[50, 51, 52, 53, 54, 55]]
    seq_lens = [90, 91, 85, 95]
    groups, lens = shared_prefixes(tables, seq_lens, BS, group_seqs=8, min_tokens=0)
    assert groups == [[0, 1, 2]] and lens == [4 * BS]


def test_a_shared_block_holding_a_members_last_key_is_not_shared():
    """Keys from the block of position seq_len - 1 on are the member's own this step."""
    tables = [[1, 2, 3, 4], [1, 2, 3, 4]]
    groups, lens = shared_prefixes(tables, [3 * BS + 1, 4 * BS], BS, group_seqs=8, min_tokens=0)
    assert lens == [3 * BS]  # row 0's last key is in block 3 (position 48)
    groups, lens = shared_prefixes(tables, [3 * BS, 4 * BS], BS, group_seqs=8, min_tokens=0)
    assert lens == [2 * BS]  # position 47 is in block 2


def test_the_group_shares_the_longest_run_all_members_agree_on():
    tables = [[1, 2, 3, 4, 5], [1, 2, 3, 9, 5], [1, 2, 8, 4, 5]]
    groups, lens = shared_prefixes(tables, [90] * 3, BS, group_seqs=8, min_tokens=0)
    assert groups == [[0, 1, 2]] and lens == [2 * BS]


def test_groups_are_cut_to_the_kernels_size_and_a_lone_remainder_reads_alone():
    tables = [[1, 2, 3, 4, 100 + i] for i in range(9)] + [[5, 6, 7, 8, 200 + i] for i in range(5)]
    groups, lens = shared_prefixes(tables, [70] * 14, BS, group_seqs=4, min_tokens=0)
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7], [9, 10, 11, 12]] and lens == [4 * BS] * 3


@pytest.mark.parametrize("seq_lens,min_tokens,expected", [
    ([70, 70], 64, [[0, 1]]),  # 4 shared blocks = 64 keys
    ([70, 40], 64, []),  # the shorter member caps the prefix at 2 blocks
    ([70, 70], 65, []),
    ([1, 1], 0, []),  # a sequence whose only key is new shares nothing
])
def test_short_prefixes_are_not_grouped(seq_lens, min_tokens, expected):
    tables = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    assert shared_prefixes(tables, seq_lens, BS, group_seqs=8, min_tokens=min_tokens)[0] == expected


def test_the_upload_lists_kv_starts_padded_members_and_lengths():
    step = StepInput(num_decodes=5, prefix_groups=[[0, 2], [1, 3, 4]], prefix_lens=[32, 64])
    assert _prefix_group_lists(step, 4) == [32, 64, 32, 64, 64] + [0, 2, -1, -1, 1, 3, 4, -1] + [32, 64]
    assert _prefix_group_lists(StepInput(num_decodes=3), 4) == []


def test_the_engine_groups_a_requests_samples_on_their_prompt_blocks(tiny_model):
    """On a real engine (CPU): every step's groups are the samples of one request, sharing the prompt's full
    blocks, which every member's table holds. The reference backend reads whole contexts, so the runner is
    told to group here as the Triton backend does."""
    from rlserve import LLM, SamplingParams
    llm = LLM(tiny_model, device="cpu", dtype="float32", block_size=BS)
    runner = llm.engine.runner
    runner.prefix_group_seqs = 3
    seen = []
    build = runner.build_step

    def check(items, copies):
        step = build(items, copies)
        decodes = [item.seq for item in items if item.num_new_tokens == 1]
        for group, n in zip(step.prefix_groups, step.prefix_lens):
            members = [decodes[i] for i in group]
            assert len({id(seq.request) for seq in members}) == 1
            assert all(seq.block_table[:n // BS] == members[0].block_table[:n // BS] for seq in members)
            assert all(n <= seq.num_computed_tokens for seq in members)
            seen.append((len(group), n))
        return step

    runner.build_step = check
    prompts = [list(range(1, 81)), list(range(100, 150))]  # 80 tokens = 5 full blocks; 50 = 3 full blocks
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, n=4, max_tokens=8, seed=3))
    assert all(len(o.outputs) == 4 for o in outs)
    assert (3, 5 * BS) in seen and (3, 3 * BS) not in seen  # 48 keys: under MIN_SHARED_PREFIX
    assert all(size in (2, 3) for size, _ in seen)
