"""What vLLM's classes do on the trainer's side of TRL's weight sync, for CPU tests without vLLM.

- ``install_fake_vllm_unique_id``: puts a module at vLLM's path holding a ``ncclUniqueId`` ctypes structure
  shaped like vLLM's (128 signed bytes), so that pickles name and rebuild it as they would with vLLM present.
- ``StatelessGroup``: vLLM's ``StatelessProcessGroup`` store protocol (``broadcast_from/<src>/<n>`` keys holding
  plain pickles; the arrival/departure barrier polled with ``store.get``), written from its documented behaviour.
- ``packed_chunks``: vLLM's packed broadcast (``packed_nccl_broadcast_producer``): tensors' bytes concatenated,
  a chunk closing right after the tensor that takes it past the buffer size.

The data plane of these tests is gloo on the same store (rlserve's CPU transport); on GPUs it is NCCL, which
``tests/test_gpu_trl.py`` exercises with vLLM's real classes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import pickle
import sys
import time
import types
import uuid

import torch
import torch.distributed as dist

MODULE = "vllm.distributed.device_communicators.pynccl_wrapper"


@contextlib.contextmanager
def install_fake_vllm_unique_id():
    class ncclUniqueId(ctypes.Structure):  # noqa: N801 -- vLLM's name
        _fields_ = [("internal", ctypes.c_byte * 128)]

    parts = MODULE.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            sys.modules[name] = types.ModuleType(name)
            added.append(name)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[name])
    ncclUniqueId.__module__, ncclUniqueId.__qualname__ = MODULE, "ncclUniqueId"
    sys.modules[MODULE].ncclUniqueId = ncclUniqueId
    try:
        yield ncclUniqueId
    finally:
        for name in added:
            sys.modules.pop(name, None)


def make_unique_id(cls, data: bytes):
    uid = cls()
    ctypes.memmove(ctypes.byref(uid), data, 128)
    return uid


class StatelessGroup:
    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 60.0):
        self.rank, self.world_size = rank, world_size
        # vLLM's create_tcp_store: TCPStore's default wait_for_workers=True -- the master's constructor waits
        # until world_size stores (itself included) have connected and counted themselves in.
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0),
                                   timeout=datetime.timedelta(seconds=timeout_s), use_libuv=False)
        self.sent = 0
        self.received = {i: 0 for i in range(world_size)}

    def broadcast_obj(self, obj, src: int):
        if self.rank == src:
            self.store.set(f"broadcast_from/{src}/{self.sent}", pickle.dumps(obj))
            self.sent += 1
            return obj
        obj = pickle.loads(self.store.get(f"broadcast_from/{src}/{self.received[src]}"))
        self.received[src] += 1
        return obj

    def barrier(self, timeout: float = 30.0) -> None:
        barrier_id = self.broadcast_obj(f"barrier_{uuid.uuid4()}" if self.rank == 0 else None, src=0)
        self.store.set(f"arrival_{barrier_id}_{self.rank}", b"1")
        self._wait_all("arrival", barrier_id, timeout)
        self.store.set(f"departure_{barrier_id}_{self.rank}", b"1")
        if self.rank != 0:
            return
        self._wait_all("departure", barrier_id, timeout)
        for i in range(self.world_size):
            self.store.delete_key(f"arrival_{barrier_id}_{i}")
            self.store.delete_key(f"departure_{barrier_id}_{i}")

    def _wait_all(self, phase: str, barrier_id: str, timeout: float) -> None:
        deadline = time.time() + timeout
        seen: set[int] = set()
        while len(seen) < self.world_size:
            if time.time() > deadline:
                raise RuntimeError(f"barrier {phase} timed out")
            for i in range(self.world_size):
                if i not in seen and self.store.check([f"{phase}_{barrier_id}_{i}"]):
                    seen.add(i)
            time.sleep(0.001)


class GlooTrainer:
    """A trainer rank: vLLM's rendezvous for metadata, gloo on the same store for tensors, and the warm-up
    all-reduce vLLM's communicator runs right after its init."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, unique_id_cls, timeout_s: float = 60.0):
        self.group = StatelessGroup(host, port, rank, world_size, timeout_s)
        if rank == 0:
            self.unique_id = self.group.broadcast_obj(make_unique_id(unique_id_cls, os.urandom(128)), src=0)
        else:
            self.unique_id = self.group.broadcast_obj(None, src=0)
        self.rank = rank
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("rlserve-gloo", self.group.store), rank, world_size,
                                        datetime.timedelta(seconds=timeout_s))
        self.pg.allreduce([torch.zeros(1)]).wait()

    def broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = self.rank, 0
        self.pg.broadcast([tensor], opts).wait()


def packed_chunks(named: list[tuple[str, torch.Tensor]], buffer_bytes: int) -> list[torch.Tensor]:
    chunks, pending, size = [], [], 0
    for _, tensor in named:
        flat = tensor.contiguous().view(torch.uint8).view(-1)
        pending.append(flat)
        size += flat.numel()
        if size > buffer_bytes:
            chunks.append(torch.cat(pending))
            pending, size = [], 0
    if pending:
        chunks.append(torch.cat(pending))
    return chunks
