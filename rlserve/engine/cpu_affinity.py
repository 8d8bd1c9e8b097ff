"""One physical CPU core per GPU process, on the GPU's own NUMA node.

A GPU replica's host side is one Python thread that schedules, launches and applies a step every few
milliseconds; on a small model that thread *is* the step time. Left to the OS, two replicas (or a replica and
the API server) can land on the two hyper-threads of one core, or on the far socket from their GPU, and a
replica's identical batch then takes up to 1.6x as long from one run to the next (BENCHMARKS.md, DP=2 on 2 x
H200). So each GPU process (a replica, a tensor-parallel worker) binds itself to one physical core (all its
hyper-threads) among the CPUs it may use that are local to its GPU, a different core for each GPU of the host;
the first such core is left to the API server and the OS when there are enough.

Nothing is bound when the host cannot give every GPU its own core, when sysfs does not say where the GPU is,
inside a Ray actor (Ray places the actors), or with ``RLSERVE_CPU_AFFINITY=off``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

HOST_CPUS_ENV = "RLSERVE_HOST_CPUS"  # the CPUs the server may use, before any process of it bound itself
SWITCH_ENV = "RLSERVE_CPU_AFFINITY"  # "off" disables binding
NVIDIA_VENDOR = "0x10de"


def parse_cpu_list(text: str) -> set[int]:
    """sysfs's "0-3,8,10-11" form."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def physical_cores(cpus: set[int], sysfs: Path) -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyper-thread siblings together), in CPU order."""
    cores: dict[tuple[int, ...], None] = {}
    for cpu in sorted(cpus):
        siblings_file = sysfs / f"devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
        try:
            siblings = parse_cpu_list(siblings_file.read_text()) & cpus
        except (OSError, ValueError):
            siblings = {cpu}
        cores.setdefault(tuple(sorted(siblings)), None)
    return list(cores)


def _numa_node(pci: Path) -> int:
    try:
        return int((pci / "numa_node").read_text())
    except (OSError, ValueError):
        return -1


def choose_core(gpu_pci_address: str, allowed: set[int], sysfs: Path) -> tuple[int, ...] | None:
    """The physical core for the process driving the GPU at ``gpu_pci_address`` ("0000:1b:00.0"), or None."""
    devices = sysfs / "bus/pci/devices"
    gpu = devices / gpu_pci_address
    if not gpu.exists():
        return None
    try:
        local = parse_cpu_list((gpu / "local_cpulist").read_text()) & allowed
    except (OSError, ValueError):
        local = set()
    node = _numa_node(gpu)
    candidates = physical_cores(local or allowed, sysfs)
    # the host's NVIDIA GPUs on the same node, each taking the next core: ours is the k-th of them
    peers = sorted(p.name for p in devices.iterdir() if _is_nvidia_gpu(p) and _numa_node(p) == node)
    if gpu_pci_address not in peers:
        peers = sorted(peers + [gpu_pci_address])
    k = peers.index(gpu_pci_address)
    spare = 1 if len(candidates) > len(peers) else 0  # the first core stays with the API server and the OS
    if len(candidates) < len(peers) + spare or not candidates:
        return None
    return candidates[spare + k]


def _is_nvidia_gpu(pci: Path) -> bool:
    try:
        return (pci / "vendor").read_text().strip() == NVIDIA_VENDOR and \
            (pci / "class").read_text().strip()[:6] in ("0x0300", "0x0302")
    except OSError:
        return False


def gpu_pci_address(device_index: int) -> str | None:
    import torch
    props = torch.cuda.get_device_properties(device_index)
    try:
        return f"{props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    except AttributeError:  # an older torch
        return None


def bind_to_gpu_core(device_index: int, sysfs: Path = Path("/sys")) -> tuple[int, ...] | None:
    """Bind this process to its GPU's core (see the module's doc); returns the CPUs, or None if not bound."""
    if os.environ.get(SWITCH_ENV, "").lower() in ("off", "0", "false") or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = parse_cpu_list(os.environ[HOST_CPUS_ENV]) if os.environ.get(HOST_CPUS_ENV) else os.sched_getaffinity(0)
    try:
        address = gpu_pci_address(device_index)
        core = choose_core(address, set(allowed), sysfs) if address else None
    except Exception:  # sysfs or the driver answered something unexpected: run unbound, as before
        logger.debug("no CPU binding for cuda:%d", device_index, exc_info=True)
        return None
    if core is None:
        return None
    # children (tensor-parallel workers) inherit our binding; they choose theirs from the host's set
    os.environ[HOST_CPUS_ENV] = ",".join(map(str, sorted(allowed)))
    os.sched_setaffinity(0, core)
    logger.info("bound to CPU core %s (cuda:%d at %s)", ",".join(map(str, core)), device_index, address)
    return core
