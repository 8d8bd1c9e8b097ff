"""The main job on the built-in default: `rlserve demo` learns, and every weight sync lands."""

from __future__ import annotations

import argparse
import json

from rlserve.demo import lowercase_fraction, train


def test_reward():
    assert lowercase_fraction(list(b"abC1")) == 0.5
    assert lowercase_fraction([]) == 0.0


def test_demo_learns_through_the_server(tmp_path):
    args = argparse.Namespace(steps=20, device="cpu", family="qwen2", port=0, n=8, max_tokens=16, lr=3e-3, seed=0,
                              output=str(tmp_path))
    records = train(args)
    assert len(records) == 20
    fifth = len(records) // 5
    first = sum(r.mean_reward for r in records[:fifth]) / fifth
    last = sum(r.mean_reward for r in records[-fifth:]) / fifth
    # A random tiny model emits a lowercase letter ~10% of the time: the first fifth sits near 0.13. Each
    # fifth averages 4 steps x 64 completions x 16 tokens = 4096 Bernoulli draws, so its standard error
    # without learning is ~0.005; a gain of 0.3 is some 60 standard errors -- learning, not luck.
    assert first < 0.3
    assert last - first > 0.3, (first, last)
    # Every sync landed: the server's logprobs for the current weights equal the trainer's to 1e-4 (the
    # engine tests' tolerance), at every step, and the version moved once per step.
    assert max(r.max_logprob_diff for r in records) < 1e-4
    assert [r.weight_version for r in records] == list(range(1, 21))
    assert (tmp_path / "demo_reward.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "demo_steps.json").read_text())) == 20
