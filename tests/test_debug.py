"""The processes' operational aids: the cyclic collector's pause counter."""

from __future__ import annotations

import gc

from rlserve import debug
from rlserve.debug import GcPauses


def test_gc_pauses_counts_each_pass_by_generation_until_closed():
    pauses = GcPauses()
    try:
        gc.collect(0)
        gc.collect()
        stats = pauses.stats()
        assert stats["num_gc_collections"][0] >= 1 and stats["num_gc_collections"][2] >= 1, stats
        assert stats["gc_seconds"][2] > 0 and 0 < stats["max_gc_pause_seconds"] <= sum(stats["gc_seconds"])
        assert stats["num_gc_frozen_objects"] == gc.get_freeze_count()
    finally:
        pauses.close()
    counted = pauses.stats()["num_gc_collections"]
    gc.collect()
    assert pauses.stats()["num_gc_collections"] == counted
    assert pauses._on_gc not in gc.callbacks


def test_freeze_startup_heap_counts_what_it_froze_once(monkeypatch):
    monkeypatch.setattr(debug, "_frozen_at_startup", 0)
    assert not debug.froze_startup_heap()
    pauses = GcPauses()
    try:
        debug.freeze_startup_heap()
        assert debug.froze_startup_heap()
        reported = pauses.stats()["num_gc_frozen_objects"]  # the count taken when the heap was frozen
        # Frozen objects still die when their last reference goes (other threads of this pytest process keep
        # dropping some), never join after the freeze: the live count can only have fallen since, and by little.
        frozen_now = gc.get_freeze_count()
        assert 0 < frozen_now <= reported <= frozen_now * 1.01, (frozen_now, reported)
    finally:
        gc.unfreeze()  # this is pytest's process: give its heap back to the collector
        pauses.close()
