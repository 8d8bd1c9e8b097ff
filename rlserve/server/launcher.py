"""``rlserve serve``: build the engine client and the app, run uvicorn, shut down cleanly.

SIGTERM/SIGINT: stop accepting work (503), let in-flight requests finish for up to ``--shutdown_timeout``
seconds, abort the rest (they answer with finish_reason "abort"), stop the replicas, exit 0; a second signal
stops at once. A dead replica: every in-flight request fails with 503, /health/ answers 503 for
``DEAD_LINGER_S`` (so that health checks see why), then exit 1. No child process outlives us: the replicas
are stopped on the way out, and exit by themselves if this process is killed.

With ``--ray_address`` the replicas are Ray actors (Ray ends them with this process): a dead one fails its own
requests with 503 and the server serves on with the others ("degraded" in /health/) until an operator
restarts it (``POST /restart_replica/{i}``).

``rlserve.cli`` owns the flags and calls ``serve(args)``; this module imports nothing from it (run
``python -m rlserve.cli serve ...``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys

import uvicorn

from rlserve.config import EngineConfig
from rlserve.models.loader import resolve_model_dir
from rlserve.server.app import create_app
from rlserve.server.replicas import EngineClient
from rlserve.debug import dump_stacks_on_sigusr1, freeze_startup_heap
from rlserve.server.security import security_config_from_args
from rlserve.tokenizer import load_tokenizer

logger = logging.getLogger("rlserve.server")

DEAD_LINGER_S = 2.0  # after an engine death: answer 503 this long before exiting


class Server(uvicorn.Server):
    """uvicorn, with a drain phase before it stops."""

    def __init__(self, config: uvicorn.Config, app, engine: EngineClient, shutdown_timeout: float):
        super().__init__(config)
        self.app_ = app
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._draining = None

    def handle_exit(self, sig: int, frame) -> None:
        if self._draining is None and sig in (signal.SIGTERM, signal.SIGINT):
            logger.info("signal %d: draining (up to %.0fs), then stopping", sig, self.shutdown_timeout)
            self.app_.state.draining = True
            loop = asyncio.get_event_loop()
            # A signal handler runs between two bytecodes of the loop's thread: hand the task over safely.
            loop.call_soon_threadsafe(self._start_drain, loop)
            self._draining = True
            return
        super().handle_exit(sig, frame)  # a second signal: stop now

    def _start_drain(self, loop) -> None:
        self._draining = loop.create_task(self._drain())

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        try:
            while self.engine.pending and loop.time() < deadline:
                await asyncio.sleep(0.1)
            if self.engine.pending:
                logger.info("aborting %d request(s) still running", len(self.engine.pending))
                await self.engine.abort(None)
                # Their "abort" outputs come back and are answered (uvicorn then waits for the responses).
                end = loop.time() + 5.0
                while self.engine.pending and loop.time() < end:
                    await asyncio.sleep(0.05)
        except Exception:
            logger.exception("draining failed; stopping anyway")
        finally:
            self.should_exit = True

    def fatal(self, message: str) -> None:
        if self.exit_code:
            return
        logger.error("stopping in %.0fs: %s", DEAD_LINGER_S, message)
        self.exit_code = 1
        try:
            asyncio.get_running_loop().call_later(DEAD_LINGER_S, setattr, self, "should_exit", True)
        except RuntimeError:  # not called from the loop (cannot happen today): stop now
            self.should_exit = True


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def resolve_advertise_host(args, placement) -> str:
    """The IP the Ray replicas dial for the API server's ZMQ sockets (and, with replica 0 pinned here, for the
    weight-sync store): ``--advertise_host``, else ``--host`` unless it is a wildcard, else this node's Ray IP.
    Resolved once, here, and checked before anything waits on it: it must be an address of this host, and not a
    loopback one while the cluster has nodes at other addresses (they would dial themselves, and startup would
    only time out). IPv4 only (``gethostbyname``), as the replicas' tcp:// addresses are."""
    wanted = args.advertise_host or (args.host if args.host not in ("0.0.0.0", "::", "") else placement.node_ip)
    flag = "--advertise_host" if args.advertise_host else "--host" if wanted == args.host else "Ray's node IP"
    try:
        ip = socket.gethostbyname(wanted)
    except OSError as e:
        raise RuntimeError(f"{flag} {wanted!r} does not resolve to an IPv4 address ({e})") from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError as e:
            raise RuntimeError(f"{flag} {wanted!r} ({ip}) is not an address of this host ({e.strerror}): pass "
                               f"--advertise_host <an IP of this node that every Ray node reaches>") from None
    alive = {str(n.get("NodeManagerAddress")) for n in placement.ray.nodes() if n.get("Alive")}
    others = sorted(a for a in alive - {ip, placement.node_ip} if not _is_loopback(a))  # nodes on other hosts
    if _is_loopback(ip) and others:
        raise RuntimeError(f"{flag} {wanted!r} is {ip}, a loopback address, which the Ray nodes at "
                           f"{', '.join(others)} cannot reach: pass --advertise_host <this node's IP> (or --host "
                           f"0.0.0.0)")
    return ip


def engine_config_from_args(args) -> EngineConfig:
    return EngineConfig(
        model=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
        tensor_parallel_size=args.tensor_parallel_size, max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, seed=args.seed, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks, load_format=args.load_format,
        fused_kernels=args.fused_kernels, max_logprobs=args.max_logprobs,
        trust_remote_code=args.trust_remote_code, async_scheduling=args.async_scheduling,
        num_scheduler_steps=args.num_scheduler_steps, shared_prefix_min_tokens=args.shared_prefix_min_tokens)


def serve(args) -> int:
    level = "DEBUG" if args.log_level == "trace" else args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    dump_stacks_on_sigusr1()
    config = engine_config_from_args(args)
    if args.vllm_model_impl not in ("auto", "vllm"):
        logger.info("--vllm_model_impl %s: rlserve runs its own model implementation", args.vllm_model_impl)
    if args.kv_cache_dtype != "auto":
        logger.info("--kv_cache_dtype %s: the KV cache is kept in the model's dtype", args.kv_cache_dtype)
    if args.distributed_executor_backend == "ray" and not getattr(args, "ray_address", None):
        logger.warning("--distributed_executor_backend ray: tensor-parallel workers stay local processes; "
                       "replicas go on a Ray cluster only with --ray_address")
    try:
        security = security_config_from_args(args)
    except ValueError as e:
        print(f"rlserve serve: error: {e}", file=sys.stderr)
        return 2
    model_dir = resolve_model_dir(config.model, config.revision)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=config.trust_remote_code)
    placement, advertise_host = None, "127.0.0.1"
    if getattr(args, "ray_address", None):
        from rlserve.server.replica_handles import RayPlacement
        try:
            placement = RayPlacement(args.ray_address, config, args.data_parallel_size,
                                     strategy=args.ray_placement_strategy, pin_first=args.ray_pin_first_replica)
        except Exception as e:  # Ray missing, or no cluster at that address
            print(f"rlserve serve: error: {e}", file=sys.stderr)
            return 2
        try:
            advertise_host = resolve_advertise_host(args, placement)
        except RuntimeError as e:
            placement.close()
            print(f"rlserve serve: error: {e}", file=sys.stderr)
            return 2
        logger.info("Ray cluster at %s: %d replica(s), ZMQ on %s (advertised to the replicas)", args.ray_address,
                    args.data_parallel_size, advertise_host)
        logger.info("the replicas' ZMQ sockets on %s admit only the replicas' CURVE key (made at this start, "
                    "passed through Ray); Ray itself runs whatever its cluster members submit: keep its network "
                    "private", advertise_host)
    engine = EngineClient(config, args.data_parallel_size, tokenizer, log_level=level, placement=placement,
                          advertise_host=advertise_host, replica_timeout_s=args.replica_timeout)
    server: Server | None = None

    def on_ready():
        # The app, the tokenizer and the replicas' clients are built: they live as long as this process.
        freeze_startup_heap()
        info = engine.info
        logger.info("rlserve serving %s on http://%s:%d | world size %d (tp %d x dp %d) | device %s %s | "
                    "KV cache %d blocks x %d = %d tokens per replica | max_model_len %d",
                    config.model, args.host, args.port, engine.world_size, config.tensor_parallel_size,
                    args.data_parallel_size, info["device"], info["dtype"], info["num_kv_blocks"],
                    info["block_size"], info["kv_capacity_tokens"], info["max_model_len"])
        print(f"rlserve ready: http://{args.host}:{args.port} model={config.model} "
              f"world_size={engine.world_size} kv_tokens={info['kv_capacity_tokens']}", flush=True)

    logger.info("admission: %s", security.describe())
    if security.api_key is None and not _is_loopback(args.host):
        logger.warning("listening on %s without an API key: whoever reaches port %d can generate%s (see "
                       "--api_key, --weight_sync_allowed_hosts, --disable_weight_sync)", args.host, args.port,
                       " and replace the weights" if security.weight_sync_enabled
                       and not security.weight_sync_allowed_hosts else "")
    app = create_app(engine, on_ready=on_ready, on_fatal=lambda m: server.fatal(m), security=security)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               timeout_graceful_shutdown=5, access_log=args.log_level in ("debug", "trace"))
    server = Server(uv_config, app, engine, args.shutdown_timeout)
    server.run()
    if not server.started and server.exit_code == 0:
        return 1  # could not bind
    return server.exit_code

