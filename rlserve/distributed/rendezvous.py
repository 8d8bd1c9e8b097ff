"""The weight-sync rendezvous, key for key what vLLM's ``StatelessProcessGroup`` does, so that TRL's clients
(which build their side with vLLM's classes) and rlserve's workers meet in one group.

A plain ``torch.distributed.TCPStore`` (no key prefix) hosted by rank 0. Rank 0 publishes objects under
``broadcast_from/0/<n>`` (n counts every broadcast of the group, on every rank), pickled. The first is the
communicator's unique id (an instance of vLLM's ``ncclUniqueId`` ctypes structure); each barrier publishes a
``barrier_<uuid>`` string, then every rank sets ``arrival_<id>_<rank>``, waits for all arrivals, sets
``departure_<id>_<rank>``, and rank 0 waits for all departures before it deletes the keys.

Who is rank 0 depends on the front door: for TRL <= 1.10 (``/init_communicator/``) it is the server's first
worker and the trainer is the last rank; for vLLM's weight-transfer API (TRL >= 1.12) it is the trainer.

Security: what comes from the store is unpickled by a restricted unpickler that accepts only a string or the
unique-id structure, never an arbitrary object.
"""

from __future__ import annotations

import datetime
import io
import pickle
import uuid

import torch.distributed as dist

from rlserve.distributed.nccl import NCCL_UNIQUE_ID_BYTES

VLLM_UNIQUE_ID_MODULE = "vllm.distributed.device_communicators.pynccl_wrapper"
VLLM_UNIQUE_ID_CLASS = "ncclUniqueId"


class UniqueId(bytes):
    """The 128 bytes of a communicator's unique id, as they travel in vLLM's pickled ``ncclUniqueId``."""


def dumps_unique_id(unique_id: bytes) -> bytes:
    """The pickle of vLLM's ``ncclUniqueId(internal=unique_id)`` -- what ``pickle.dumps`` of that ctypes
    structure produces (``_ctypes._unpickle(cls, ({}, bytes))``), written out opcode by opcode because vLLM is
    not importable here (and must not need to be)."""
    if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError(f"a unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")

    def text(s: str) -> bytes:  # SHORT_BINUNICODE
        data = s.encode()
        return b"\x8c" + bytes([len(data)]) + data

    return (pickle.PROTO + bytes([4])
            + text("_ctypes") + text("_unpickle") + pickle.STACK_GLOBAL
            + text(VLLM_UNIQUE_ID_MODULE) + text(VLLM_UNIQUE_ID_CLASS) + pickle.STACK_GLOBAL
            + pickle.EMPTY_DICT + pickle.SHORT_BINBYTES + bytes([NCCL_UNIQUE_ID_BYTES]) + unique_id
            + pickle.TUPLE2 + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows two globals, both stand-ins made for this one load (so that a payload's BUILD opcode, which sets
    attributes on what it is given, changes nothing that outlives it)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._unique_id_class = type("ncclUniqueId", (), {})

    def _rebuild_ctypes(self, cls, state):
        if cls is not self._unique_id_class or not isinstance(state, tuple) or len(state) != 2:
            raise pickle.UnpicklingError("only an NCCL unique id may be rebuilt")
        data = state[1]
        if not isinstance(data, bytes) or len(data) != NCCL_UNIQUE_ID_BYTES:
            raise pickle.UnpicklingError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes")
        return UniqueId(data)

    def find_class(self, module: str, name: str):
        if (module, name) == ("_ctypes", "_unpickle"):
            return lambda cls, state: self._rebuild_ctypes(cls, state)
        if (module, name) == (VLLM_UNIQUE_ID_MODULE, VLLM_UNIQUE_ID_CLASS):
            return self._unique_id_class
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from the weight-sync store")


def loads_restricted(data: bytes):
    """Unpickle a string, bytes, or a unique id (as ``UniqueId``); anything else is an UnpicklingError."""
    obj = _RestrictedUnpickler(data).load()
    if not isinstance(obj, (str, bytes)):
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} in the weight-sync store")
    return obj


class StoreGroup:
    """The metadata side of one rank of the group (vLLM's ``StatelessProcessGroup``, minus what weight sync
    never uses). Every wait is bounded by ``timeout_s``."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.rank, self.world_size = rank, world_size
        self.timeout = datetime.timedelta(seconds=timeout_s)
        # As vLLM creates it: every store (client or master) counts itself in on connecting, and the master's
        # constructor returns once all ``world_size`` have. A client that skipped the count would leave a
        # vLLM-side master (TRL >= 1.12's trainer) waiting until its timeout.
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=self.timeout)
        self.num_sent = 0  # broadcasts published by this rank (as rank 0)
        self.num_received = 0  # broadcasts read from rank 0

    def broadcast_obj(self, obj, src: int = 0):
        """Rank 0 publishes ``obj``; the others read it. Only rank 0 ever broadcasts in this protocol."""
        if src != 0:
            raise ValueError("only rank 0 broadcasts in the weight-sync rendezvous")
        if self.rank == 0:
            data = dumps_unique_id(obj) if isinstance(obj, UniqueId) else pickle.dumps(obj)
            self.store.set(f"broadcast_from/0/{self.num_sent}", data)
            self.num_sent += 1
            return obj
        key = f"broadcast_from/0/{self.num_received}"
        obj = loads_restricted(self.store.get(key))  # get() waits for the key, up to the store's timeout
        self.num_received += 1
        return obj

    def barrier(self) -> None:
        """vLLM's store barrier: every rank arrives, then rank 0 waits until every rank has left."""
        barrier_id = self.broadcast_obj(f"barrier_{uuid.uuid4()}" if self.rank == 0 else None)
        if not isinstance(barrier_id, str):
            raise RuntimeError(f"expected a barrier id from rank 0, got {type(barrier_id).__name__}")
        ranks = range(self.world_size)
        self.store.set(f"arrival_{barrier_id}_{self.rank}", b"1")
        self.store.wait([f"arrival_{barrier_id}_{i}" for i in ranks], self.timeout)
        self.store.set(f"departure_{barrier_id}_{self.rank}", b"1")
        if self.rank != 0:
            return
        self.store.wait([f"departure_{barrier_id}_{i}" for i in ranks], self.timeout)
        for i in ranks:
            self.store.delete_key(f"arrival_{barrier_id}_{i}")
            self.store.delete_key(f"departure_{barrier_id}_{i}")
        # Every rank has read this barrier's id (it arrived): its key can go too. (vLLM keeps such keys for an
        # hour; TRL <= 1.10 makes one barrier per tensor per step, so they would pile up in the store.)
        self.store.delete_key(f"broadcast_from/0/{self.num_sent - 1}")

    def close(self) -> None:
        self.store = None
