"""Operational aids shared by rlserve's processes."""

from __future__ import annotations

import faulthandler
import gc
import signal
import time


def dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's Python stack to stderr: where a stuck server, replica or
    tensor-parallel worker waits, without stopping it (the API server, each replica and each TP worker
    install it)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def freeze_startup_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's reach, once start-up is done (as
    vLLM's engine core and API server do). A long-running process's start-up heap -- modules, the model's
    Python objects, the app -- lives as long as the process; without this every full (generation-2) pass
    walks all of it again: ~100 ms for a replica's ~220k objects on a CPU, a pause of a decode loop whose
    steps take 5-7 ms on a GPU. Collect first, so that start-up garbage is freed rather than frozen.

    Once per process, at the end of start-up: a frozen object is never collected by the collector (reference
    counting still frees it), so freezing per request would leak every cycle a request leaves behind."""
    global _frozen_at_startup
    gc.collect()
    gc.freeze()
    _frozen_at_startup = gc.get_freeze_count()


_frozen_at_startup = 0  # objects frozen by freeze_startup_heap (get_freeze_count walks them all: counted once)


def froze_startup_heap() -> bool:
    """Whether this process froze its start-up heap (a library caller's own freeze is not ours to undo)."""
    return _frozen_at_startup > 0


class GcPauses:
    """This process's cyclic-collector passes and the time they stopped it, per generation, from
    ``gc.callbacks``. Installed by its owner (a replica, the app's lifespan) and removed by ``close``."""

    def __init__(self):
        self.num_collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_pause_seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        # Passes do not nest (the collector holds the GIL and does not re-enter): one start clock suffices.
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.num_collections[generation] += 1
        self.seconds[generation] += pause
        self.max_pause_seconds = max(self.max_pause_seconds, pause)

    def stats(self) -> dict:
        return {"num_gc_collections": list(self.num_collections), "gc_seconds": list(self.seconds),
                "max_gc_pause_seconds": self.max_pause_seconds, "num_gc_frozen_objects": _frozen_at_startup}

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


def patch_triton_interpreter() -> None:
    """Triton <= 3.6's interpreter (TRITON_INTERPRET=1: kernels on CPU tensors, for tests and probes) with numpy >=
    2.4: a loop bounded by a kernel argument calls int() on a 1-element array, which numpy now rejects
    (triton-lang/triton#9171). The upstream fix, applied to this process only; nothing without Triton."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    if hasattr(interpreter, "_patch_lang_tensor") and not getattr(interpreter, "_rlserve_patched", False):
        original = interpreter._patch_lang_tensor

        def patch(tensor, scope):
            original(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

        interpreter._patch_lang_tensor = patch
        interpreter._rlserve_patched = True
