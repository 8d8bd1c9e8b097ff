"""Binding GPU processes to CPU cores (rlserve/engine/cpu_affinity.py), on a made-up sysfs tree."""
from pathlib import Path

import pytest

from rlserve.engine import cpu_affinity as ca


def make_sysfs(root: Path, cpus_per_node: int, nodes: int, gpus: dict[str, int], smt: bool = True) -> Path:
    """``nodes`` NUMA nodes of ``cpus_per_node`` CPUs; with ``smt`` CPU i and i + total/2 are siblings (Linux's
    usual numbering); ``gpus``: PCI address -> node. A NIC on node 0 is listed too (it must not count)."""
    total = cpus_per_node * nodes
    half = total // 2
    for cpu in range(total):
        sib = {cpu, (cpu + half) % total} if smt else {cpu}
        d = root / f"devices/system/cpu/cpu{cpu}/topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(",".join(map(str, sorted(sib))) + "\n")

    def node_cpus(n):  # physical cores n*k.. plus their siblings
        per = cpus_per_node // 2 if smt else cpus_per_node
        first = list(range(n * per, (n + 1) * per))
        return first + ([c + half for c in first] if smt else [])

    def device(address, vendor, cls, node):
        d = root / "bus/pci/devices" / address
        d.mkdir(parents=True)
        (d / "vendor").write_text(vendor + "\n")
        (d / "class").write_text(cls + "\n")
        (d / "numa_node").write_text(f"{node}\n")
        (d / "local_cpulist").write_text(",".join(map(str, node_cpus(node))) + "\n")

    for address, node in gpus.items():
        device(address, ca.NVIDIA_VENDOR, "0x030200", node)
    device("0000:05:00.0", "0x15b3", "0x020000", 0)  # a NIC
    return root


def test_cpu_lists_parse_as_sysfs_writes_them():
    assert ca.parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert ca.parse_cpu_list("5") == {5} and ca.parse_cpu_list("") == set()


def test_each_gpu_gets_its_own_physical_core_on_its_own_node_and_the_first_core_is_left(tmp_path):
    sysfs = make_sysfs(tmp_path, cpus_per_node=8, nodes=2,
                       gpus={"0000:1b:00.0": 0, "0000:2c:00.0": 0, "0000:9d:00.0": 1, "0000:ae:00.0": 1})
    allowed = set(range(16))
    chosen = {gpu: ca.choose_core(gpu, allowed, sysfs)
              for gpu in ("0000:1b:00.0", "0000:2c:00.0", "0000:9d:00.0", "0000:ae:00.0")}
    # node 0 holds physical cores 0-3 (siblings 8-11): core 0 is left, the GPUs take cores 1 and 2
    assert chosen["0000:1b:00.0"] == (1, 9) and chosen["0000:2c:00.0"] == (2, 10)
    assert chosen["0000:9d:00.0"] == (5, 13) and chosen["0000:ae:00.0"] == (6, 14)
    assert len({c for core in chosen.values() for c in core}) == 8  # no two GPUs share a CPU


def test_no_binding_when_the_cpus_are_too_few_or_the_gpu_is_unknown(tmp_path):
    sysfs = make_sysfs(tmp_path, cpus_per_node=4, nodes=1,
                       gpus={"0000:1b:00.0": 0, "0000:2c:00.0": 0, "0000:3d:00.0": 0})
    # 2 physical cores for 3 GPUs: no core each, so none is bound
    assert ca.choose_core("0000:1b:00.0", {0, 1, 2, 3}, sysfs) is None
    assert ca.choose_core("0000:ff:00.0", {0, 1, 2, 3}, sysfs) is None
    # exactly one core per GPU (no spare): each still gets its own
    sysfs2 = make_sysfs(tmp_path / "b", cpus_per_node=4, nodes=1, gpus={"0000:1b:00.0": 0, "0000:2c:00.0": 0})
    assert ca.choose_core("0000:1b:00.0", {0, 1, 2, 3}, sysfs2) == (0, 2)
    assert ca.choose_core("0000:2c:00.0", {0, 1, 2, 3}, sysfs2) == (1, 3)


def test_a_restricted_cpu_set_is_respected(tmp_path):
    """In a container allowed CPUs 2-7 of node 0 only, the cores come from those CPUs."""
    sysfs = make_sysfs(tmp_path, cpus_per_node=16, nodes=1, gpus={"0000:1b:00.0": 0}, smt=False)
    assert ca.choose_core("0000:1b:00.0", set(range(2, 8)), sysfs) == (3,)


@pytest.mark.skipif(not hasattr(ca.os, "sched_setaffinity"), reason="Linux only")
def test_bind_sets_the_affinity_and_tells_children_the_host_set(tmp_path, monkeypatch):
    allowed = ca.os.sched_getaffinity(0)
    cpus = sorted(allowed)
    calls = []
    monkeypatch.setattr(ca, "gpu_pci_address", lambda index: "0000:1b:00.0")
    monkeypatch.setattr(ca, "choose_core", lambda address, allowed_set, sysfs: (cpus[-1],))
    monkeypatch.setattr(ca.os, "sched_setaffinity", lambda pid, core: calls.append((pid, tuple(core))))
    monkeypatch.delenv(ca.HOST_CPUS_ENV, raising=False)
    monkeypatch.delenv(ca.SWITCH_ENV, raising=False)
    assert ca.bind_to_gpu_core(0, tmp_path) == (cpus[-1],)
    assert calls == [(0, (cpus[-1],))]
    assert ca.parse_cpu_list(ca.os.environ[ca.HOST_CPUS_ENV]) == set(allowed)
    calls.clear()
    monkeypatch.setenv(ca.SWITCH_ENV, "off")  # as inside a Ray actor
    assert ca.bind_to_gpu_core(0, tmp_path) is None and calls == []
