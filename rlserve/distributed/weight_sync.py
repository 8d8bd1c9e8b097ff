"""Weight sync: a trainer pushes tensors into every worker of a running server.

A process group made for the purpose -- never the trainer's default group -- with vLLM's rendezvous (see
``rendezvous.py``), so that TRL's own clients can join it: the server's workers (every data-parallel replica
× tensor-parallel rank) and the trainer meet through a TCP store, then broadcast over NCCL (``nccl.py``) when
both sides hold CUDA tensors, gloo otherwise.

Tensors travel in buckets: flat buffers of one dtype (or raw bytes, for vLLM's packed format), with a metadata
list (name, shape, offset) that the server validates entirely before any byte moves. Each worker receives every
bucket and loads it through the model's per-parameter weight loaders (its TP shard, its fused slot). While
bucket k is being loaded, bucket k+1 is already on the wire. Every rendezvous and collective has a timeout.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
BUCKET_DTYPES = {**DTYPE_NAMES, "uint8": torch.uint8}  # uint8: vLLM's packed buckets of mixed dtypes
VLLM_PACKED_BUFFER_BYTES = 1 << 30  # vLLM's default packed_buffer_size_bytes


def parse_dtype(name: str) -> torch.dtype:
    """ "torch.bfloat16" or "bfloat16" -> torch.bfloat16; ValueError for anything else."""
    key = str(name).removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)} (optionally prefixed 'torch.'), got {name!r}")
    return DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class TensorMeta:
    name: str
    shape: list[int]
    offset: int  # in elements of the bucket's dtype (bytes, for a uint8 bucket)
    dtype: str | None = None  # the tensor's own dtype, in a uint8 bucket; None: the bucket's

    @property
    def numel(self) -> int:
        return _numel(self.shape)


@dataclass
class BucketMeta:
    dtype: str
    numel: int
    tensors: list[TensorMeta] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BucketMeta":
        return cls(d["dtype"], d["numel"], [TensorMeta(**t) for t in d["tensors"]])


def plan_vllm_buckets(names: list[str], dtypes: list[str], shapes: list[list[int]], packed: bool,
                      buffer_bytes: int = VLLM_PACKED_BUFFER_BYTES) -> list[BucketMeta]:
    """The broadcasts vLLM's weight-transfer engine makes for these tensors, in order. Unpacked: one per tensor.
    Packed: the tensors' bytes concatenated, a chunk closing right after the tensor that takes it past
    ``buffer_bytes`` (vLLM's ``packed_nccl_broadcast_producer``/``_consumer`` rule; both sides must agree)."""
    if not packed:
        return [BucketMeta(dtype, _numel(shape), [TensorMeta(name, list(shape), 0)])
                for name, dtype, shape in zip(names, dtypes, shapes)]
    buckets: list[BucketMeta] = []
    bucket = None
    for name, dtype, shape in zip(names, dtypes, shapes):
        if bucket is None:
            bucket = BucketMeta("uint8", 0)
            buckets.append(bucket)
        bucket.tensors.append(TensorMeta(name, list(shape), bucket.numel, dtype))
        bucket.numel += _numel(shape) * _itemsize(dtype)
        if bucket.numel > buffer_bytes:
            bucket = None
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_buckets(named: Iterable[tuple[str, torch.dtype, tuple[int, ...]]], bucket_bytes: int) -> list[BucketMeta]:
    """Group tensors by dtype into flat buckets of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    buckets: list[BucketMeta] = []
    open_bucket: dict[str, BucketMeta] = {}
    for name, dtype, shape in named:
        key = dtype_name(dtype)
        meta = TensorMeta(name, list(shape), 0)
        size = meta.numel * dtype.itemsize
        bucket = open_bucket.get(key)
        if bucket is None or (bucket.numel and (bucket.numel * _itemsize(key) + size) > bucket_bytes):
            bucket = BucketMeta(key, 0)
            buckets.append(bucket)
            open_bucket[key] = bucket
        meta.offset = bucket.numel
        bucket.tensors.append(meta)
        bucket.numel += meta.numel
    return buckets


def _itemsize(dtype: str) -> int:
    return BUCKET_DTYPES[dtype].itemsize


def pack_bucket(bucket: BucketMeta, tensors: dict[str, torch.Tensor], device: torch.device,
                out: torch.Tensor | None = None) -> torch.Tensor:
    flat = out if out is not None else torch.empty(bucket.numel, dtype=BUCKET_DTYPES[bucket.dtype], device=device)
    for t in bucket.tensors:
        flat[t.offset:t.offset + t.numel].copy_(tensors[t.name].detach().reshape(-1))
    return flat


def unpack_bucket(bucket: BucketMeta, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Views of the bucket's tensors (a copy only for a tensor at a misaligned byte offset of a packed one)."""
    out = []
    for t in bucket.tensors:
        if t.dtype is None or t.dtype == bucket.dtype:
            out.append((t.name, flat[t.offset:t.offset + t.numel].view(t.shape)))
            continue
        dtype = BUCKET_DTYPES[t.dtype]
        raw = flat[t.offset:t.offset + t.numel * dtype.itemsize]
        if t.offset % dtype.itemsize:
            raw = raw.clone()
        out.append((t.name, raw.view(dtype).view(t.shape)))
    return out


@dataclass(frozen=True)
class GroupSpec:
    """How a server worker joins a trainer's weight-sync group: plain values, sent from the API server to
    every worker, which takes rank ``rank_offset + its worker index``.

    ``/init_communicator/`` (TRL <= 1.10, rlserve.Client): rank_offset 0, the trainer is the last rank, and
    every update ends in a store barrier. vLLM's ``/init_weight_transfer_engine`` (TRL >= 1.12): the trainer is
    rank 0 (it hosts the store), workers start at the ``rank_offset`` it names, and no barrier follows."""
    host: str
    port: int
    world_size: int
    trainer_rank: int
    rank_offset: int = 0
    backend: str = "nccl"  # "nccl" (GPU to GPU) or "gloo" (through host memory)
    timeout_s: float = 120.0
    barrier_after_update: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class WeightSyncGroup:
    """One rank of the weight-sync group: vLLM's store rendezvous (``StoreGroup``) for metadata and barriers,
    and a communicator made from the unique id that rank 0 publishes there -- NCCL through ``libnccl`` on CUDA,
    gloo (on the same store) on the CPU.

    Construction blocks until every rank has joined; ``warm_up`` (the all-reduce vLLM's communicator runs right
    after its init) is separate, so that a server runs it between engine steps, in order with its own
    collectives."""

    def __init__(self, spec: GroupSpec, rank: int, device: torch.device):
        from rlserve.distributed.rendezvous import StoreGroup, UniqueId
        self.spec, self.rank, self.world_size, self.device = spec, rank, spec.world_size, device
        self.src = spec.trainer_rank
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self.timeout = datetime.timedelta(seconds=spec.timeout_s)
        self.store = StoreGroup(spec.host, spec.port, rank, spec.world_size, spec.timeout_s)
        self.comm = self.pg = None
        if rank == 0:
            uid = UniqueId(_new_unique_id(self.backend))
            self.store.broadcast_obj(uid)
        else:
            uid = self.store.broadcast_obj(None)
            if not isinstance(uid, UniqueId):
                raise RuntimeError(f"rank 0 published a {type(uid).__name__}, not a communicator id")
        if self.backend == "nccl":
            from rlserve.distributed.nccl import NcclCommunicator
            self.comm = NcclCommunicator(bytes(uid), rank, spec.world_size, device)
        else:
            prefix = dist.PrefixStore("rlserve-gloo", self.store.store)
            self.pg = dist.ProcessGroupGloo(prefix, rank, spec.world_size, self.timeout)
        self._buffers: dict[tuple, torch.Tensor] = {}

    def warm_up(self) -> None:
        self.wait(self.all_reduce_async(torch.zeros(1, dtype=torch.float32, device=self.device)))

    def buffer(self, dtype: torch.dtype, numel: int, slot: int) -> torch.Tensor:
        """A flat transfer buffer. On the CPU, buffers are kept between updates: fresh host memory costs a
        page fault per 4 KB on first touch (the GPU's caching allocator already reuses its memory)."""
        if self.device.type != "cpu":
            return torch.empty(numel, dtype=dtype, device=self.device)
        key = (dtype, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def broadcast_async(self, tensor: torch.Tensor):
        if self.comm is not None:
            return self.comm.broadcast(tensor, self.src)
        opts = dist.BroadcastOptions()
        opts.rootRank = self.src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def all_reduce_async(self, tensor: torch.Tensor):
        if self.comm is not None:
            return self.comm.all_reduce(tensor)
        return self.pg.allreduce([tensor])

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.wait(self.broadcast_async(tensor))

    def wait(self, work) -> None:
        if self.comm is not None:
            self.comm.wait(work, self.timeout.total_seconds())
        elif not work.wait(self.timeout):
            raise TimeoutError(f"weight-sync collective timed out after {self.timeout.total_seconds():.0f}s")

    def barrier(self) -> None:
        self.store.barrier()

    def close(self) -> None:
        comm, self.comm, self.pg = self.comm, None, None
        if comm is not None:
            comm.abort()
        self.store.close()


def _new_unique_id(backend: str) -> bytes:
    if backend == "nccl":
        from rlserve.distributed.nccl import new_unique_id
        return new_unique_id()
    return os.urandom(128)  # gloo meets on the store; the id keeps the key sequence the same for both


def receive_buckets(group: WeightSyncGroup, buckets: list[BucketMeta],
                    load: Callable[[list[tuple[str, torch.Tensor]]], None]) -> int:
    """Receive every bucket and hand its tensors to ``load``; bucket k+1 is on the wire while bucket k loads.
    Returns the bytes received."""
    received = 0
    if not buckets:
        return 0

    def post(i):
        flat = group.buffer(BUCKET_DTYPES[buckets[i].dtype], buckets[i].numel, i % 2)
        return flat, group.broadcast_async(flat)

    pending = post(0)
    for i, bucket in enumerate(buckets):
        flat, work = pending
        group.wait(work)
        if i + 1 < len(buckets):
            pending = post(i + 1)
        load(unpack_bucket(bucket, flat))
        received += flat.numel() * flat.element_size()
    return received


def pack_for_send(group: WeightSyncGroup, buckets: list[BucketMeta], tensors: dict[str, torch.Tensor], i: int
                  ) -> torch.Tensor:
    bucket = buckets[i]
    return pack_bucket(bucket, tensors, group.device, group.buffer(BUCKET_DTYPES[bucket.dtype], bucket.numel, i % 2))


def send_buckets(group: WeightSyncGroup, buckets: list[BucketMeta], tensors: dict[str, torch.Tensor],
                 first: torch.Tensor | None = None) -> int:
    """The trainer's side: pack and broadcast each bucket, packing the next while one is in flight.
    ``first``: bucket 0 already packed (while the server was validating the metadata)."""
    sent = 0
    pending = None
    for i, bucket in enumerate(buckets):
        flat = first if i == 0 and first is not None else pack_for_send(group, buckets, tensors, i)
        work = group.broadcast_async(flat)  # NCCL's stream waits for the packing copies on ours
        if pending is not None:
            group.wait(pending[1])
        pending = (flat, work)
        sent += flat.numel() * flat.element_size()
    if pending is not None:
        group.wait(pending[1])
    return sent


def send_streamed(group: WeightSyncGroup, buckets: list[BucketMeta],
                  named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
    """The trainer's side for tensors that exist one at a time (TRL's iterator gathers a sharded parameter, or
    merges adapters, only for the time of its yield): each is copied into its bucket when yielded, and buckets
    are broadcast in order as they fill, at most two in flight. Every announced tensor must come, once."""
    where = {t.name: (i, t) for i, bucket in enumerate(buckets) for t in bucket.tensors}
    remaining = [len(bucket.tensors) for bucket in buckets]
    flats: dict[int, torch.Tensor] = {}
    in_flight: list[tuple[int, object]] = []
    next_bucket = sent = 0
    for name, tensor in named_tensors:
        if name not in where:
            raise ValueError(f"{name!r} was not announced, or came twice")
        i, meta = where.pop(name)
        if i not in flats:
            flats[i] = torch.empty(buckets[i].numel, dtype=BUCKET_DTYPES[buckets[i].dtype], device=group.device)
        flats[i][meta.offset:meta.offset + meta.numel].copy_(tensor.detach().reshape(-1))
        remaining[i] -= 1
        while next_bucket < len(buckets) and remaining[next_bucket] == 0:
            in_flight.append((next_bucket, group.broadcast_async(flats[next_bucket])))
            sent += flats[next_bucket].numel() * flats[next_bucket].element_size()
            next_bucket += 1
            if len(in_flight) > 1:
                done, work = in_flight.pop(0)
                group.wait(work)
                del flats[done]
    if where:
        raise ValueError(f"announced but never sent: {sorted(where)[:5]}")
    for _, work in in_flight:
        group.wait(work)
    return sent
