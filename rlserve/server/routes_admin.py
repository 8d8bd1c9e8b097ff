"""rlserve's own endpoints: server info, Prometheus metrics, pause/resume, abort, restart a replica."""

from __future__ import annotations

import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from rlserve.server.errors import EngineUnavailable
from rlserve.engine import messages as msg
from rlserve.server.routing import engine_of, route
from rlserve.server.schemas import AbortRequest, PauseRequest

logger = logging.getLogger(__name__)
router = APIRouter()


@route(router, "GET", "/server_info/")
async def server_info(request: Request):
    engine = engine_of(request)
    if engine.is_alive:
        live = {r.index: r for r in engine.live_replicas()}  # the objects asked (a restart may replace one)
        for index, stats in (await engine.call_each(msg.GetStats(), timeout_s=10.0)).items():
            if isinstance(stats, dict):  # else a busy or dead replica: report what we last heard
                live[index].stats = stats
    replicas = [{"replica": r.index, **r.handle.describe(), "dead": r.dead, "generation": r.generation,
                 "awaiting_weights": r.awaiting_weights is not None, **r.stats} for r in engine.replicas]
    return {
        "model": engine.config.model, "status": _status(request),
        "tensor_parallel_size": engine.config.tensor_parallel_size,
        "data_parallel_size": engine.data_parallel_size, "world_size": engine.world_size,
        "weight_version": min((r.get("weight_version", 0) for r in replicas), default=0),
        "requested_weight_version": engine.weight_version,
        "engine": engine.info, "replicas": replicas, "counters": dict(engine.counters),
        "api_process": api_process_stats(request.app),
        "vllm_config": vllm_config(request),
    }


def api_process_stats(app) -> dict:
    """The API process's own cyclic-collector figures (each replica reports its own in its stats)."""
    pauses = getattr(app.state, "gc_pauses", None)
    return pauses.stats() if pauses is not None else {}


def vllm_config(request: Request) -> dict:
    """The parts of vLLM's ``/server_info?config_format=json`` tree that TRL (>= 1.12) reads: whether weight
    transfer is on, the logprobs mode (rlserve's logprobs are of the processed distribution), parallelism."""
    engine = engine_of(request)
    config = engine.config
    on_cuda = config.resolved_device().type == "cuda"
    sync_on = getattr(request.app.state, "weight_sync_enabled", True)
    return {
        "model_config": {"model": config.model, "revision": config.revision, "dtype": str(config.dtype),
                         "max_model_len": engine.info.get("max_model_len"), "logprobs_mode": "processed_logprobs"},
        "parallel_config": {"tensor_parallel_size": config.tensor_parallel_size,
                            "pipeline_parallel_size": 1, "data_parallel_size": engine.data_parallel_size,
                            "world_size": config.tensor_parallel_size},
        "cache_config": {"enable_prefix_caching": config.enable_prefix_caching,
                         "gpu_memory_utilization": config.gpu_memory_utilization},
        "weight_transfer_config": {"backend": "nccl" if on_cuda else "gloo"} if sync_on else None,
        "lora_config": None,
    }


def _status(request: Request) -> str:
    engine = engine_of(request)
    if engine.dead is not None:
        return "dead"
    if request.app.state.draining:
        return "draining"
    if not engine.ready.is_set():
        return "starting"
    if len(engine.routable_replicas()) < len(engine.replicas):  # Ray: dead, restarting or awaiting weights
        if engine.routable_replicas():
            return "degraded"
        # Up, but every live replica waits for the trainer's push (weight sync still works: not dead).
        return "awaiting_weights" if engine.live_replicas() else "dead"
    return "serving"


@route(router, "POST", "/pause/")
async def pause(request: Request, body: PauseRequest | None = None,
                mode: Literal["abort", "wait", "keep"] | None = None):
    """``abort``: in-flight requests end now with finish_reason "abort"; ``wait``: they finish, then the
    engine pauses; ``keep``: they freeze and continue after /resume/. New requests wait until then. The mode
    comes in the body, or as vLLM takes it, in the query (``/pause?mode=keep``, what TRL's async GRPO sends)."""
    engine = engine_of(request)
    engine.check_alive()
    mode = mode or (body or PauseRequest()).mode
    await engine.pause(mode)
    return {"message": f"paused ({mode})", "mode": mode}


@route(router, "POST", "/resume/")
async def resume(request: Request):
    engine = engine_of(request)
    engine.check_alive()
    await engine.resume()
    return {"message": "resumed"}


@route(router, "POST", "/abort/")
async def abort(request: Request, body: AbortRequest | None = None):
    """Abort every running request (no ``request_ids``), or those of the given ids: an id given as
    ``X-Request-Id`` names the engine requests ``{id}-{i}`` of its prompts. They end with finish_reason
    "abort" and their partial output; unknown ids are ignored."""
    engine = engine_of(request)
    engine.check_alive()
    ids = (body or AbortRequest()).request_ids
    found = list(engine.pending) if ids is None else engine.find_requests(ids)
    await engine.abort(found)
    return {"message": f"aborted {len(found)} request(s)", "request_ids": ids, "aborted": found}


@route(router, "POST", "/restart_replica/{index}/")
async def restart_replica(request: Request, index: int):
    """Ray only (--ray_address): start a dead replica again, in its bundle of the placement group (anywhere Ray
    finds room when its node is gone); answered once it serves. It starts from the model's weights on disk and
    outside the weight-sync group, which is closed on the other replicas too: the trainer inits the group
    again (``init_communicator``) and pushes its weights."""
    engine = engine_of(request)
    if request.app.state.draining:
        raise EngineUnavailable("server is shutting down")
    result = await engine.restart_replica(index)
    request.app.state.weight_sync_init = None  # the group lacks the new replica's ranks: updates get 409
    try:
        await engine.call_all(msg.CloseWeightSync())
    except Exception as e:  # a group that cannot be closed cleanly is replaced at the next init anyway
        logger.warning("closing the weight-sync group after restarting replica %d: %s", index, e)
    return {"message": f"replica {index} restarted; init the weight-sync group again before the next update",
            **result}


class EngineCollector:
    """Reads the engine client's counters and the replicas' latest stats at scrape time."""

    def __init__(self, engine, app=None):
        self.engine = engine
        self.app = app  # for the API process's own figures

    def collect(self):
        e = self.engine
        requests = CounterMetricFamily("rlserve_requests", "Finished engine requests by outcome",
                                       labels=["status"])
        for status in ("ok", "failed", "aborted"):
            requests.add_metric([status], e.counters[f"requests_{status}"])
        yield requests
        yield CounterMetricFamily("rlserve_prompt_tokens", "Prompt tokens received",
                                  value=e.counters["prompt_tokens"])
        yield CounterMetricFamily("rlserve_generation_tokens", "Tokens generated",
                                  value=e.counters["generation_tokens"])
        gauges = {
            "num_running": ("rlserve_running_sequences", "Sequences running"),
            "num_waiting": ("rlserve_waiting_sequences", "Sequences waiting"),
            "kv_blocks_used": ("rlserve_kv_blocks_used", "KV cache blocks in use"),
            "kv_blocks_free": ("rlserve_kv_blocks_free", "KV cache blocks free"),
            "kv_blocks_total": ("rlserve_kv_blocks_total", "KV cache blocks in all"),
            "weight_version": ("rlserve_weight_version", "Weight version served"),
            "is_paused": ("rlserve_paused", "1 while the engine is paused (/pause/)"),
            "max_running_seqs": ("rlserve_max_running_sequences", "Most sequences that ran in one step"),
            "mean_step_seconds": ("rlserve_step_seconds", "Mean engine step time (recent)"),
            "last_weight_sync_seconds": ("rlserve_weight_sync_seconds", "Duration of the last weight update"),
        }
        for key, (name, doc) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["replica"])
            for r in e.replicas:
                stats = dict(r.stats, is_paused=r.stats.get("paused") is not None) if r.stats else {}
                if stats.get(key) is not None:
                    g.add_metric([str(r.index)], float(stats[key]))
            yield g
        counters = {
            "num_steps": ("rlserve_engine_steps", "Engine steps (a multi-step launch counts once)"),
            "step_seconds_total": ("rlserve_engine_step_seconds", "Seconds spent inside engine steps"),
            "num_multi_request_steps": ("rlserve_batched_steps", "Engine steps that ran several requests"),
            "num_multi_step_launches": ("rlserve_multi_step_launches",
                                        "Launches that ran several decode steps (--num_scheduler_steps)"),
            "num_preemptions": ("rlserve_preemptions", "Sequences preempted for recompute"),
            "prefix_cache_hit_tokens": ("rlserve_prefix_cache_hit_tokens", "Prompt tokens found in the cache"),
            "prefix_cache_queried_tokens": ("rlserve_prefix_cache_queried_tokens", "Prompt tokens looked up"),
        }
        for key, (name, doc) in counters.items():
            c = CounterMetricFamily(name, doc, labels=["replica"])
            for r in e.replicas:
                if key in r.stats:
                    c.add_metric([str(r.index)], float(r.stats[key]))
            yield c
        hit = GaugeMetricFamily("rlserve_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache")
        stats = e.aggregate_stats()
        queried = stats.get("prefix_cache_queried_tokens", 0)
        hit.add_metric([], stats.get("prefix_cache_hit_tokens", 0) / queried if queried else 0.0)
        yield hit
        yield from self.collect_gc()

    def collect_gc(self):
        """The cyclic collector's passes and pauses per process ("api", "replica0", ...) and generation: a full
        (generation-2) pass stops a replica's decode loop for as long as it walks the heap."""
        processes = [("api", api_process_stats(self.app) if self.app is not None else {})]
        processes += [(f"replica{r.index}", r.stats or {}) for r in self.engine.replicas]
        passes = CounterMetricFamily("rlserve_gc_collections", "Cyclic garbage collector passes",
                                     labels=["process", "generation"])
        seconds = CounterMetricFamily("rlserve_gc_seconds", "Time stopped in the cyclic garbage collector",
                                      labels=["process", "generation"])
        frozen = GaugeMetricFamily("rlserve_gc_frozen_objects", "Start-up objects out of the collector's reach",
                                   labels=["process"])
        for process, stats in processes:
            if "num_gc_collections" not in stats:
                continue
            for generation in range(3):
                passes.add_metric([process, str(generation)], stats["num_gc_collections"][generation])
                seconds.add_metric([process, str(generation)], stats["gc_seconds"][generation])
            frozen.add_metric([process], stats["num_gc_frozen_objects"])
        yield from (passes, seconds, frozen)


def make_metrics_registry(engine, app=None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine, app))
    return registry


@route(router, "GET", "/metrics")
async def metrics(request: Request):
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
