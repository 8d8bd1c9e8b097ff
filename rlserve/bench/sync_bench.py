"""``sync-medium``: push the rl-medium state dict (~3.1 GB bf16) from a trainer on one GPU into a server on
another, end to end (HTTP included), beside a raw ``torch.distributed.broadcast`` of one flat tensor of the
same size between the same two GPUs, in the same run:
``python -m rlserve.bench.sync_bench --trainer_gpu 0 --server_gpu 1``.

With vLLM's Python importable (TRL's trainer environment), TRL's two wire protocols are timed too, driven by
vLLM's own trainer-side classes as TRL's clients drive them: ``trl-per-tensor`` (TRL <= 1.10: one
``/update_named_param/`` + broadcast + store barrier per tensor) and ``vllm-packed`` (TRL >= 1.12:
start / ``update_weights`` with vLLM's packed 1 GB chunks / finish).

On a CPU-only machine (``--device cpu``) the same pair is measured for the cpu-tiny model over gloo.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from rlserve.bench.bench import device_name, git_commit, prepare_model
from rlserve.bench.server_bench import start_bench_server
from rlserve.bench.workloads import get_workload
from rlserve.server.process import free_port


def _raw_rank(rank: int, port: int, device: str, numel: int, repeats: int, queue) -> None:
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=datetime.timedelta(seconds=120))
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=2)
    tensor = torch.empty(numel, dtype=torch.bfloat16, device=dev)
    if rank == 0:
        tensor.normal_()
    times = []
    for i in range(repeats + 2):
        dist.barrier()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        dist.broadcast(tensor, src=0)
        dist.barrier()  # the receiver has it
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= 2:
            times.append(time.perf_counter() - start)
    if rank == 0:
        queue.put(statistics.median(times))
    dist.destroy_process_group()


def raw_broadcast_seconds(nbytes: int, trainer_device: str, server_device: str, repeats: int = 5) -> float:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_raw_rank, args=(rank, port, device, nbytes // 2, repeats, queue))
             for rank, device in enumerate((trainer_device, server_device))]
    for p in procs:
        p.start()
    seconds = queue.get(timeout=600)
    for p in procs:
        p.join(60)
    return seconds


def run_sync_bench(device: str = "cuda", trainer_gpu: int = 0, server_gpu: int = 1, repeats: int = 3,
                   bucket_size_mb: float = 512, output: str | None = None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlserve import Client
    on_gpu = device == "cuda"
    workload = get_workload("rl-medium" if on_gpu else "cpu-tiny")
    dev = torch.device(f"cuda:{trainer_gpu}" if on_gpu else "cpu")
    model_dir, random_weights = prepare_model(workload, Path.home() / ".cache" / "rlserve" / "bench",
                                              torch.device(device))
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if on_gpu else torch.float32)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    server_device = torch.device(f"cuda:{server_gpu}" if on_gpu else "cpu")
    server = start_bench_server(model_dir, server_device, random_weights, 1, 1,
                                extra=["--gpu_memory_utilization", "0.3", "--max_model_len", "4096"])
    try:
        client = Client(base_url=server.url, group_port=free_port())
        client.init_communicator(device=dev, timeout_s=300)
        client.update_model_params(model, bucket_size_mb)  # warm-up: communicator set-up, allocator
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            version = client.update_model_params(model, bucket_size_mb)
            times.append(time.perf_counter() - start)
        info = client.server_info()
        assert info["weight_version"] == version, (info["weight_version"], version)
        client.close_communicator()
        trl_paths = _time_trl_paths(server.url, model, dev, repeats) if on_gpu else {}
    finally:
        server.stop(60)
    seconds = statistics.median(times)
    raw = raw_broadcast_seconds(nbytes, str(dev), f"cuda:{server_gpu}" if on_gpu else "cpu")
    result = {"name": "sync-medium" if on_gpu else "sync-cpu-tiny", "model": workload.name,
              "device": device_name(dev), "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
              "bytes": nbytes, "bucket_size_mb": bucket_size_mb,
              "rlserve_seconds": seconds, "rlserve_gb_per_s": nbytes / seconds / 1e9,
              "raw_broadcast_seconds": raw, "raw_gb_per_s": nbytes / raw / 1e9, "fraction_of_raw": raw / seconds,
              "all_rlserve_seconds": times,
              **{f"{path}_seconds": t for path, t in trl_paths.items()},
              **{f"{path}_gb_per_s": nbytes / t / 1e9 for path, t in trl_paths.items()}}
    print(f"{result['name']}: {nbytes / 1e9:.2f} GB in {seconds * 1e3:.0f} ms end to end "
          f"({result['rlserve_gb_per_s']:.1f} GB/s); raw broadcast {raw * 1e3:.0f} ms "
          f"({result['raw_gb_per_s']:.1f} GB/s): {result['fraction_of_raw']:.0%} of raw")
    for name, t in trl_paths.items():
        print(f"  {name}: {t * 1e3:.0f} ms ({nbytes / t / 1e9:.1f} GB/s)")
    path = Path(output or f"bench_results/{result['name']}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


def _time_trl_paths(url: str, model, dev: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each TRL wire protocol, driven by vLLM's classes; {} without vLLM."""
    try:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerSendWeightsArgs, NCCLWeightTransferEngine
    except ImportError:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    http = httpx.Client(base_url=url, timeout=600)
    world = http.get("/get_world_size/").json()["world_size"] + 1
    torch.cuda.set_device(dev)
    params = [(n, p.data) for n, p in model.named_parameters()]
    times: dict[str, list[float]] = {"trl-per-tensor": [], "vllm-packed": []}

    port = free_port()  # TRL <= 1.10
    http.post("/init_communicator/", json={"host": "0.0.0.0", "port": port, "world_size": world,
                                           "client_device_uuid": "bench"}).raise_for_status()
    comm = PyNcclCommunicator(StatelessProcessGroup.create("127.0.0.1", port, world - 1, world), device=dev)
    for i in range(repeats + 1):
        start = time.perf_counter()
        for name, tensor in params:
            http.post("/update_named_param/", json={"name": name, "dtype": str(tensor.dtype),
                                                    "shape": list(tensor.shape)}).raise_for_status()
            comm.broadcast(tensor, src=world - 1)
            comm.group.barrier()
        http.post("/reset_prefix_cache/").raise_for_status()
        if i:
            times["trl-per-tensor"].append(time.perf_counter() - start)
    http.post("/close_communicator/").raise_for_status()

    port = free_port()  # TRL >= 1.12
    init_info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": world}
    pool = ThreadPoolExecutor(1)  # the server answers these once the trainer's side is done: post them aside
    answer = pool.submit(lambda: http.post("/init_weight_transfer_engine", json={"init_info": init_info}))
    group = NCCLWeightTransferEngine.trainer_init(init_info)
    answer.result().raise_for_status()
    info = {"names": [n for n, _ in params], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in params],
            "shapes": [list(t.shape) for _, t in params], "packed": True}
    for i in range(repeats + 1):
        start = time.perf_counter()
        http.post("/start_weight_update", json={}).raise_for_status()
        update = pool.submit(lambda: http.post("/update_weights", json={"update_info": info}))
        NCCLWeightTransferEngine.trainer_send_weights(iter(params), NCCLTrainerSendWeightsArgs(group=group,
                                                                                               packed=True))
        update.result().raise_for_status()  # a failed update is an error, not a time
        http.post("/finish_weight_update", json={}).raise_for_status()
        http.post("/reset_prefix_cache").raise_for_status()
        if i:
            times["vllm-packed"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trainer_gpu", type=int, default=0)
    parser.add_argument("--server_gpu", type=int, default=1)
    parser.add_argument("--bucket_size_mb", type=float, default=512)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    run_sync_bench(args.device, args.trainer_gpu, args.server_gpu, bucket_size_mb=args.bucket_size_mb,
                   output=args.output)
