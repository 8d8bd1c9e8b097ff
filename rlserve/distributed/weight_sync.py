"""Weight sync: a trainer pushes tensors into every worker of a running server.

A process group made for the purpose -- never the trainer's default group: the server's workers (every
data-parallel replica × tensor-parallel rank) are ranks 0..W-1, the trainer is rank W; rendezvous through a
TCPStore whose server is worker 0. NCCL when both sides hold CUDA tensors, gloo otherwise.

Tensors travel in buckets: flat buffers of one dtype, up to a size, with a metadata list (name, shape,
offset) that the server validates entirely before any byte moves. Each worker receives every bucket and loads
it through the model's per-parameter weight loaders (its TP shard, its fused slot). While bucket k is being
loaded, bucket k+1 is already on the wire. Every rendezvous and collective has a timeout.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}


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
    offset: int  # in elements, within the bucket

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


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
    return DTYPE_NAMES[dtype].itemsize


def pack_bucket(bucket: BucketMeta, tensors: dict[str, torch.Tensor], device: torch.device,
                out: torch.Tensor | None = None) -> torch.Tensor:
    flat = out if out is not None else torch.empty(bucket.numel, dtype=DTYPE_NAMES[bucket.dtype], device=device)
    for t in bucket.tensors:
        flat[t.offset:t.offset + t.numel].copy_(tensors[t.name].detach().reshape(-1))
    return flat


def unpack_bucket(bucket: BucketMeta, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(t.name, flat[t.offset:t.offset + t.numel].view(t.shape)) for t in bucket.tensors]


class WeightSyncGroup:
    """One side of the weight-sync process group."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float = 120.0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, {world_size})")
        self.rank, self.world_size, self.device = rank, world_size, device
        self.src = world_size - 1  # the trainer
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=self.timeout,
                                   wait_for_workers=False)
        prefix = dist.PrefixStore("rlserve-weight-sync", self.store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = self.timeout
            self.pg = dist.ProcessGroupNCCL(prefix, rank, world_size, options)
            self.backend = "nccl"
        else:
            self.pg = dist.ProcessGroupGloo(prefix, rank, world_size, self.timeout)
            self.backend = "gloo"
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.barrier()  # everyone arrived: the group is usable

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
        opts = dist.BroadcastOptions()
        opts.rootRank = self.src
        opts.rootTensor = 0
        return self.pg.broadcast([tensor], opts)

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.wait(self.broadcast_async(tensor))

    def wait(self, work) -> None:
        if not work.wait(self.timeout):
            raise TimeoutError(f"weight-sync collective timed out after {self.timeout.total_seconds():.0f}s")

    def barrier(self) -> None:
        t = torch.zeros(1, device=self.device)
        self.wait(self.pg.allreduce([t]))

    def close(self) -> None:
        pg, self.pg = getattr(self, "pg", None), None
        if pg is not None and self.backend == "nccl":
            try:
                pg.abort()
            except Exception:  # already torn down
                pass
        self.store = None


def receive_buckets(group: WeightSyncGroup, buckets: list[BucketMeta],
                    load: Callable[[list[tuple[str, torch.Tensor]]], None]) -> int:
    """Receive every bucket and hand its tensors to ``load``; bucket k+1 is on the wire while bucket k loads.
    Returns the bytes received."""
    received = 0
    if not buckets:
        return 0

    def post(i):
        flat = group.buffer(DTYPE_NAMES[buckets[i].dtype], buckets[i].numel, i % 2)
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
    return pack_bucket(bucket, tensors, group.device, group.buffer(DTYPE_NAMES[bucket.dtype], bucket.numel, i % 2))


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
