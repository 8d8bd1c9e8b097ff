"""A small ctypes binding to the ``libnccl`` that PyTorch already loaded: communicators made from an external
unique id, which ``torch.distributed.ProcessGroupNCCL`` cannot take.

TRL's clients build their side of the weight-sync group with vLLM's ``PyNcclCommunicator``: rank 0 calls
``ncclGetUniqueId``, publishes the id through a TCP store, and every rank calls ``ncclCommInitRank`` with it.
To meet them, rlserve must create its communicator the same way (vLLM does this with ctypes too). Only what
weight sync needs is bound: unique id, init, broadcast, all-reduce, abort.

Collectives are enqueued on the caller's current CUDA stream and return at once; ``wait`` polls a CUDA event
with a deadline, so that a trainer that died mid-broadcast is a ``TimeoutError`` (and ``abort`` frees the
stuck kernel) rather than a hang.
"""

from __future__ import annotations

import ctypes
import glob
import os
import time

import torch

NCCL_UNIQUE_ID_BYTES = 128

_ncclComm_t = ctypes.c_void_p


class NcclUniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * NCCL_UNIQUE_ID_BYTES)]


_DTYPES = {torch.int8: 0, torch.uint8: 1, torch.int32: 2, torch.int64: 4, torch.float16: 6, torch.float32: 7,
           torch.float64: 8, torch.bfloat16: 9}
_SUM = 0


def _find_library() -> str:
    """The libnccl this process already mapped (PyTorch's), else an override, else the pip package's, else the
    loader's default: two different NCCL builds in one process must be avoided."""
    for var in ("RLSERVE_NCCL_SO_PATH", "VLLM_NCCL_SO_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libnccl.so" in path:
                    return path
    except OSError:
        pass
    try:
        import nvidia.nccl  # the wheel PyTorch depends on
        found = glob.glob(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so*"))
        if found:
            return sorted(found)[0]
    except ImportError:
        pass
    return "libnccl.so.2"


class _Library:
    _instance: "_Library | None" = None

    def __init__(self):
        torch.cuda.init()  # loads PyTorch's NCCL where it links it lazily
        self.path = _find_library()
        lib = ctypes.CDLL(self.path)
        c_int, vp, size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        self.lib = lib
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetErrorString.argtypes = [c_int]
        self._bind("ncclGetVersion", [ctypes.POINTER(c_int)])
        self._bind("ncclGetUniqueId", [ctypes.POINTER(NcclUniqueId)])
        self._bind("ncclCommInitRank", [ctypes.POINTER(_ncclComm_t), c_int, NcclUniqueId, c_int])
        self._bind("ncclBroadcast", [vp, vp, size_t, c_int, c_int, _ncclComm_t, vp])
        self._bind("ncclAllReduce", [vp, vp, size_t, c_int, c_int, _ncclComm_t, vp])
        self._bind("ncclCommAbort", [_ncclComm_t])

    def _bind(self, name: str, argtypes: list) -> None:
        fn = getattr(self.lib, name)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes

    def check(self, result: int, what: str) -> None:
        if result != 0:
            message = self.lib.ncclGetErrorString(result).decode(errors="replace")
            raise RuntimeError(f"{what} failed: NCCL error {result}: {message}")

    @classmethod
    def get(cls) -> "_Library":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def version(self) -> str:
        v = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        major, rest = divmod(v.value, 10000)
        minor, patch = divmod(rest, 100)
        return f"{major}.{minor}.{patch}"


def new_unique_id() -> bytes:
    lib = _Library.get()
    uid = NcclUniqueId()
    lib.check(lib.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid.internal)  # c_byte is signed; bytes() maps it back to 0..255


class NcclCommunicator:
    """One rank of an NCCL communicator on ``device``, made from a unique id every rank shares."""

    def __init__(self, unique_id: bytes, rank: int, world_size: int, device: torch.device):
        if len(unique_id) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, got {len(unique_id)}")
        if device.index is None:  # "the current device" is per thread, and ranks join in threads: callers name it
            raise ValueError(f"NcclCommunicator needs a CUDA device with its index (cuda:N), got {device}")
        self.lib = _Library.get()
        self.rank, self.world_size, self.device = rank, world_size, device
        uid = NcclUniqueId()
        ctypes.memmove(ctypes.byref(uid), unique_id, NCCL_UNIQUE_ID_BYTES)
        self.comm = _ncclComm_t()
        with torch.cuda.device(device):
            # Blocks until every rank called it (NCCL's own bootstrap over TCP): callers run it in a thread.
            self.lib.check(self.lib.lib.ncclCommInitRank(ctypes.byref(self.comm), world_size, uid, rank),
                           "ncclCommInitRank")

    def _stream(self) -> ctypes.c_void_p:
        return ctypes.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)

    def _event(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.cuda.Event:
        """Enqueue a broadcast of ``tensor`` (contiguous, on our device) from ``src``; returns its event."""
        if tensor.device != self.device or not tensor.is_contiguous():
            raise ValueError(f"broadcast needs a contiguous tensor on {self.device}, got {tensor.device}")
        ptr = ctypes.c_void_p(tensor.data_ptr())
        self.lib.check(self.lib.lib.ncclBroadcast(ptr, ptr, tensor.numel(), _DTYPES[tensor.dtype], src,
                                                  self.comm, self._stream()), "ncclBroadcast")
        return self._event()

    def all_reduce(self, tensor: torch.Tensor) -> torch.cuda.Event:
        """In-place sum; vLLM's communicator runs one on a float32 zero right after init (a warm-up every rank
        must join)."""
        ptr = ctypes.c_void_p(tensor.data_ptr())
        self.lib.check(self.lib.lib.ncclAllReduce(ptr, ptr, tensor.numel(), _DTYPES[tensor.dtype], _SUM,
                                                  self.comm, self._stream()), "ncclAllReduce")
        return self._event()

    @staticmethod
    def wait(event: torch.cuda.Event, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pause = 20e-6
        while not event.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"NCCL collective did not complete within {timeout_s:.0f}s (a rank is gone?)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def abort(self) -> None:
        """Free the communicator, also with a collective stuck waiting for a dead peer."""
        comm, self.comm = self.comm, None
        if comm is not None:
            self.lib.lib.ncclCommAbort(comm)
