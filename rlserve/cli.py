"""The ``rlserve`` command: serve, bench, sweep, demo.

``rlserve serve`` takes the flags of ``trl vllm-serve``, each in both ``_`` and ``-`` spellings.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys


def _flag(parser, name: str, **kwargs):
    """One option with both spellings, --a_b and --a-b."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    parser.add_argument(*spellings, dest=name, **kwargs)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="Start the generation server (the flags of `trl vllm-serve`).",
        description="Start an rlserve generation server: TRL's HTTP protocol, an OpenAI-compatible subset and "
                    "weight sync from a trainer.")
    p.add_argument("model_positional", nargs="?", default=None, metavar="MODEL",
                   help="The model, as `vllm serve MODEL` takes it (or --model).")
    _flag(p, "model", default=None, help="Model name or path to load the model from.")
    _flag(p, "revision", default=None,
          help="Revision to use for the model. If not specified, the default branch will be used.")
    _flag(p, "tensor_parallel_size", type=int, default=1, help="Number of tensor parallel workers to use.")
    _flag(p, "data_parallel_size", type=int, default=1, help="Number of data parallel workers to use.")
    _flag(p, "host", default="0.0.0.0", help="Host address to run the server on.")
    _flag(p, "port", type=int, default=8000, help="Port to run the server on.")
    _flag(p, "gpu_memory_utilization", type=float, default=0.9,
          help="Ratio (between 0 and 1) of GPU memory to reserve for the model weights, activations, and KV "
               "cache on the device dedicated to generation. Higher values will increase the KV cache size and "
               "thus improve the model's throughput. However, if the value is too high, it may cause "
               "out-of-memory (OOM) errors during initialization.")
    _flag(p, "dtype", default="auto",
          help="Data type to use for generation. If set to 'auto', the data type will be automatically "
               "determined based on the model configuration (float32 on CPU).")
    _flag(p, "max_model_len", type=int, default=None,
          help="If set, the max_model_len to use. This can be useful when running with reduced "
               "gpu_memory_utilization, leading to a reduced KV cache size. If not set, the model context size "
               "is used, which might be much larger than the KV cache, leading to inefficiencies.")
    _flag(p, "enable_prefix_caching", type=_bool, nargs="?", const=True, default=True,
          help="Whether to enable prefix caching (default: true; `--enable_prefix_caching false` to disable).")
    _flag(p, "enforce_eager", type=_bool, nargs="?", const=True, default=False,
          help="Whether to enforce eager execution. If set to True, CUDA graphs are disabled and the model "
               "always runs eagerly. If False (default), decode steps replay CUDA graphs.")
    p.add_argument("--log_level", "--log-level", "--uvicorn-log-level", "--uvicorn_log_level", dest="log_level",
                   default="info", choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="Log level for uvicorn. Possible choices: critical, error, warning, info, debug, trace.")
    _add_compat_flags(p)
    _flag(p, "device", default=None, help="Device to run on: cuda or cpu (default: cuda when available).")
    _flag(p, "max_num_seqs", type=int, default=None, help="Most sequences running at once in one replica.")
    _flag(p, "max_num_batched_tokens", type=int, default=None, help="Token budget of one engine step.")
    _flag(p, "num_kv_blocks", type=int, default=None, help="Force the KV cache size in blocks (testing).")
    _flag(p, "block_size", type=int, default=16, help="Tokens per KV cache block.")
    _flag(p, "seed", type=int, default=None,
          help="Seed of the random streams of requests that do not give one (each data-parallel replica "
               "derives its own from it). Default: fresh entropy at every start, so that replicas and "
               "restarts draw independent samples.")
    _flag(p, "load_format", default="auto", choices=["auto", "dummy"],
          help="'dummy' starts from random weights (benchmarks, or a trainer that pushes all weights).")
    _flag(p, "shutdown_timeout", type=float, default=30.0,
          help="Seconds to finish in-flight requests after SIGTERM before aborting them.")
    _flag(p, "replica_timeout", type=float, default=300.0,
          help="Seconds of silence after which a started engine replica counts as hung (between steps it sends "
               "stats 4 times a second, so one step longer than this counts too; a weight-sync call, which waits on "
               "the trainer under its own timeout, does not): it is declared dead like a replica whose process "
               "ended, and its requests fail with a 503. 0: never.")
    # $RLSERVE_FUSED=0 (the benchmarks' before/after switch) sets the default here, at the edge, as in LLM(...);
    # the engine reads only its config, and the model runner applies the choice once.
    _flag(p, "fused_kernels", type=_bool, nargs="?", const=True, default=os.environ.get("RLSERVE_FUSED", "1") != "0",
          help="Use the fused Triton kernels for add+RMSNorm, rotary and SiLU-and-mul on CUDA (default: true, "
               "unless $RLSERVE_FUSED=0; `false` runs PyTorch's per-layer ops, for comparisons).")
    _flag(p, "async_scheduling", type=_bool, nargs="?", const=True, default=None,
          help="Schedule and launch each engine step while the device still runs the one before (vLLM's "
               "--async-scheduling; default: on where the engine runs on CUDA, as in vLLM, off on CPU; `false` turns "
               "it off). Outputs equal the synchronous engine's in the CPU tests; on a "
               "GPU other batch shapes (an extra row, another CUDA-graph bucket) can change logits in the last bits. "
               "Steps that need the previous step's tokens on the host first "
               "(structured outputs, prompt logprobs, the first draw of a prompt with n > 1) run one at a time.")
    _flag(p, "num_scheduler_steps", type=int, default=1,
          help="Run up to this many decode steps per launch when every running sequence decodes plainly (vLLM V0's "
               "--num-scheduler-steps; default: 1): less host work per token. The draws are counter-based, so the "
               "tokens are one step at a time's where the batches are the same (a sample that ends inside a burst "
               "keeps its row to the end, which on a GPU can change logits in the last bits). Tokens reach the API "
               "(and a stream) this many at a time; aborts, weight updates and waiting requests wait for the burst. "
               "A step holding a prefill or any sequence with structured outputs, penalties or min_tokens not "
               "reached runs one step.")
    _flag(p, "shared_prefix_min_tokens", type=int, default=1024,
          help="Decode rows that share at least this many prompt tokens (a prompt's samples) read them once a group "
               "in decode attention, on CUDA (default: 1024; 0: never). Meant for long prompts (+10%% end to end "
               "at 2,048 tokens on one H200, one round: BENCHMARKS.md); at a few hundred tokens the re-reads are "
               "cheap already.")
    # Several nodes (rlserve/server/replica_handles.py; README "Several nodes (Ray)").
    _flag(p, "ray_address", default=None,
          help="Run the data-parallel replicas as Ray actors on a Ray cluster: 'auto' (the cluster this node "
               "joined with `ray start`), 'ray://host:10001' or 'host:6379'. Needs `pip install rlserve[ray]` on "
               "every node. A dead replica then fails only its own requests; POST /restart_replica/{i} restarts it.")
    _flag(p, "advertise_host", default=None,
          help="With --ray_address: the address of this node the replicas connect back to (ZMQ over tcp://; "
               "default: --host when it is a specific address, else the node IP Ray reports for this node).")
    _flag(p, "ray_placement_strategy", default="PACK", choices=["PACK", "SPREAD", "STRICT_SPREAD"],
          help="With --ray_address: how replicas spread over nodes (one replica never spans nodes). PACK "
               "(default) fills a node before the next; SPREAD prefers different nodes.")
    _flag(p, "ray_pin_first_replica", type=_bool, nargs="?", const=True, default=True,
          help="With --ray_address: place replica 0 on this node (default: true). TRL <= 1.10's weight sync "
               "(init_communicator) has the server's rank 0 host the group's store, which the trainer dials at "
               "the server's host; `false` when the trainer speaks vLLM's protocol (it hosts the store).")
    # Admission (rlserve/server/security.py); README "Security" says what is open by default and why.
    _flag(p, "api_key", default=None,
          help="Require 'Authorization: Bearer <key>' on every route but /health (default: $RLSERVE_API_KEY, "
               "else $VLLM_API_KEY, else no key: TRL's clients send none).")
    _flag(p, "disable_weight_sync", type=_bool, nargs="?", const=True, default=False,
          help="Refuse every weight-sync route with 403 (an inference-only server).")
    _flag(p, "weight_sync_allowed_hosts", default=None,
          help="Comma-separated client addresses or networks (e.g. 10.0.0.5,127.0.0.1 or 10.0.0.0/24) that may "
               "call the weight-sync routes; others get 403 (default: any host).")
    # Defaults as in SecurityConfig (not imported: `rlserve bench` should not pay for FastAPI).
    _flag(p, "max_request_body_mb", type=float, default=64.0,
          help="Largest request body in MiB; larger ones get 413 (default: 64).")
    _flag(p, "max_prompts_per_request", type=int, default=16384,
          help="Most prompts in one /generate/, /chat/ or /v1/completions request; more get 400 "
               "(default: 16384).")
    _flag(p, "max_completions_per_request", type=int, default=262144,
          help="Most completions (prompts x n) in one request; more get 400 (default: 262144 = 16384 x 16).")


def _add_compat_flags(p) -> None:
    """The rest of `trl vllm-serve`'s flags, and those TRL >= 1.12 passes to `vllm serve`, so that a command line
    written for either starts rlserve unchanged. What rlserve cannot honour is refused at start, naming the flag
    (check_compat_flags); what does not apply to rlserve is accepted and logged."""
    p.add_argument("--no-enable-prefix-caching", "--no_enable_prefix_caching", dest="enable_prefix_caching",
                   action="store_false", help="vLLM's spelling of --enable_prefix_caching false.")
    p.add_argument("--enable-scale-out", "--enable_scale_out", action="store_true",
                   help="Accepted for compatibility (TRL >= 1.16 passes it to vLLM >= 0.30); no effect.")
    _flag(p, "trust_remote_code", type=_bool, nargs="?", const=True, default=False,
          help="Let transformers run the model repository's code to load its config and tokenizer (rlserve runs "
               "its own model implementation either way).")
    _flag(p, "kv_cache_dtype", default="auto",
          help="KV cache dtype: only 'auto' (the model's dtype); fp8 caches are not supported and refused.")
    p.add_argument("--vllm_model_impl", "--vllm-model-impl", "--model_impl", "--model-impl", dest="vllm_model_impl",
                   default="auto", help="Accepted for compatibility: rlserve always runs its own model code.")
    _flag(p, "distributed_executor_backend", default=None, choices=["mp", "uni", "ray"],
          help="Accepted for compatibility: tensor-parallel workers are local processes. Replicas go on a Ray "
               "cluster only with --ray_address (which opens control sockets to the cluster's network).")
    _flag(p, "speculative_config", default=None, help="Not supported (refused when given).")
    _flag(p, "max_logprobs", type=int, default=20,
          help="Most top logprobs a request may ask for per token (vLLM's default 20; -1, what TRL >= 1.12 starts "
               "vLLM with for distillation's top-k teacher logprobs: up to 1000, as for prompt logprobs).")
    _flag(p, "logprobs_mode", default="processed_logprobs", choices=["processed_logprobs"],
          help="Logprobs after temperature and logit processing: the only mode (the one TRL requires).")
    _flag(p, "weight_transfer_config", default=None,
          help="vLLM's JSON, e.g. '{\"backend\": \"nccl\"}': accepted for compatibility (rlserve picks NCCL on CUDA "
               "and gloo on CPUs); a backend other than nccl or gloo is refused.")


def check_compat_flags(args) -> list[str]:
    """Errors for compatibility flags rlserve cannot honour (empty when all is well)."""
    import json
    errors = []
    if args.model is None:
        args.model = args.model_positional
    elif args.model_positional is not None and args.model_positional != args.model:
        errors.append(f"two models given: {args.model_positional!r} and --model {args.model!r}")
    if args.model is None:
        errors.append("the model is required: rlserve serve --model MODEL (or rlserve serve MODEL)")
    if args.kv_cache_dtype.startswith("fp8"):
        errors.append(f"--kv_cache_dtype {args.kv_cache_dtype}: not supported (rlserve keeps the KV cache in the "
                      "model's dtype; use auto)")
    if args.speculative_config:
        errors.append("--speculative_config: speculative decoding is not supported")
    if args.max_logprobs < -1:
        errors.append(f"--max_logprobs must be -1 (no cap) or >= 0, got {args.max_logprobs}")
    if args.weight_transfer_config:
        try:
            backend = json.loads(args.weight_transfer_config).get("backend", "nccl")
        except (ValueError, AttributeError):
            backend = None
            errors.append(f"--weight_transfer_config must be a JSON object, got {args.weight_transfer_config!r}")
        if backend is not None and backend not in ("nccl", "gloo"):
            errors.append(f"--weight_transfer_config backend {backend!r}: only nccl and gloo are supported")
    return errors


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="Measure a workload beside transformers and the roofline.")
    from rlserve.bench.workloads import WORKLOADS  # plain data, no torch
    _flag(p, "workload", default="cpu-tiny", choices=list(WORKLOADS), help="../shared/WORKLOADS.md's names")
    _flag(p, "device", default=None)
    _flag(p, "no_baseline", action="store_true", help="Skip the transformers baseline.")
    _flag(p, "modes", default="plain,logprobs0,seeded",
          help="Comma-separated sampling modes, each timed on a cold prefix cache: plain (no logprobs, no seed), "
               "logprobs0 (logprobs=0), seeded (logprobs=0 and a seed per request). Default: all three.")
    _flag(p, "logprobs", default=None, choices=["both", "none", "0"],
          help="Older spelling of --modes: none = plain, 0 = logprobs0, both = plain,logprobs0.")
    _flag(p, "against", default=None, choices=["vllm"],
          help="Run the workload through vLLM too (a subprocess on the same card, same prompts and sampling, "
               "VLLM_USE_FLASHINFER_SAMPLER=0, prefix caching on) and report rlserve / vLLM per mode.")
    _flag(p, "rounds", type=int, default=1,
          help="Time each engine this many times, each in a fresh engine (vLLM: a fresh process), taking turns "
               "(with --against vllm, vLLM first in odd rounds, rlserve in even ones); report the medians and "
               "each round's ratio.")
    _flag(p, "output", default=None, help="JSON path (default: bench_results/<workload>.json).")
    _flag(p, "through_server", action="store_true", help="Measure through a real HTTP server as well.")
    _flag(p, "concurrency", type=int, default=None, help="With --through_server: a load generator with C "
                                                         "concurrent clients, reporting latency percentiles.")
    _flag(p, "data_parallel_size", type=int, default=1)
    _flag(p, "tensor_parallel_size", type=int, default=1)
    _flag(p, "enforce_eager", action="store_true")
    _flag(p, "async_scheduling", type=_bool, nargs="?", const=True, default=None,
          help="rlserve's engine with host/device overlap or, with `false`, without (serve's --async_scheduling; "
               "default: serve's, on for CUDA); with --through_server, pass it in --server_args instead.")
    _flag(p, "num_scheduler_steps", type=int, default=1,
          help="rlserve's engine with up to this many decode steps per launch (serve's --num_scheduler_steps); with "
               "--through_server, pass it in --server_args instead.")
    _flag(p, "shared_prefix_min_tokens", type=int, default=None,
          help="rlserve's engine reading a shared prefix of at least this many tokens once a group of samples "
               "(serve's --shared_prefix_min_tokens; default: serve's; 0: never).")
    _flag(p, "repeats", type=int, default=3, help="With --through_server: best of this many runs of each path.")
    _flag(p, "num_prompts", type=int, default=None,
          help="Run the workload with this many prompts (same n and lengths; the first ones of its seed): half of "
               "them times what one replica of DP=2 does with a split batch.")
    _flag(p, "server_args", default="",
          help="With --through_server: more `rlserve serve` flags, one string (e.g. \"--ray_address auto\" to time "
               "Ray replicas against the same workload's local ones).")


def cmd_bench(args) -> int:
    if args.logprobs is not None:
        modes = {"both": ("plain", "logprobs0"), "none": ("plain",), "0": ("logprobs0",)}[args.logprobs]
    else:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    engine_kwargs = {"enforce_eager": True} if args.enforce_eager else {}
    if args.async_scheduling is not None:
        engine_kwargs["async_scheduling"] = args.async_scheduling
    if args.num_scheduler_steps != 1:
        engine_kwargs["num_scheduler_steps"] = args.num_scheduler_steps
    if args.shared_prefix_min_tokens is not None:
        engine_kwargs["shared_prefix_min_tokens"] = args.shared_prefix_min_tokens
    if args.through_server and (args.async_scheduling is not None or args.num_scheduler_steps != 1
                                or args.shared_prefix_min_tokens is not None):
        print("rlserve bench: with --through_server, pass --async_scheduling, --num_scheduler_steps and "
              "--shared_prefix_min_tokens in --server_args (the server's flags; the offline engine beside it reads "
              "them too)", file=sys.stderr)
        return 2
    if args.rounds < 1 or (args.through_server and args.rounds != 1):
        print("rlserve bench: --rounds must be at least 1, and does not combine with --through_server (which "
              "takes --repeats)", file=sys.stderr)
        return 2
    if args.through_server and args.against:
        print("rlserve bench: --against vllm runs the offline engines; it does not combine with --through_server",
              file=sys.stderr)
        return 2
    workload = args.workload
    if args.num_prompts is not None:
        from dataclasses import replace

        from rlserve.bench.workloads import get_workload
        if args.num_prompts < 1:
            print("rlserve bench: --num_prompts must be at least 1", file=sys.stderr)
            return 2
        workload = replace(get_workload(workload), num_prompts=args.num_prompts)
    if args.through_server:
        from rlserve.bench.server_bench import run_server_bench
        run_server_bench(workload, device=args.device, output=args.output, concurrency=args.concurrency,
                         data_parallel_size=args.data_parallel_size,
                         tensor_parallel_size=args.tensor_parallel_size, repeats=args.repeats,
                         server_args=shlex.split(args.server_args))
        return 0
    if args.tensor_parallel_size > 1:
        engine_kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    from rlserve.bench.bench import run_bench
    from rlserve.bench.workloads import BenchError
    try:
        run_bench(workload, device=args.device, baseline=not args.no_baseline, modes=modes,
                  output=args.output, engine_kwargs=engine_kwargs, against=(args.against,) if args.against else (),
                  rounds=args.rounds)
    except BenchError as e:  # an unknown mode, vLLM not importable or failing: say so plainly
        print(f"rlserve bench: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlserve", description="A generation server for online RL training.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    add_bench_parser(sub)
    for name, adder in _extra_parsers():
        adder(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        errors = check_compat_flags(args)
        if errors:
            for error in errors:
                print(f"rlserve serve: error: {error}", file=sys.stderr)
            return 2
        from rlserve.server.launcher import serve
        return serve(args)
    if args.command == "bench":
        return cmd_bench(args)
    for name, _ in _extra_parsers():
        if args.command == name:
            return args.handler(args)
    parser.error(f"unknown command {args.command}")
    return 2


def serve_engine_config(argv: list[str]):
    """The EngineConfig `rlserve serve ARGV` would run (every spelling of every flag, as serve parses them)."""
    from rlserve.server.launcher import engine_config_from_args
    parser = argparse.ArgumentParser(prog="rlserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return engine_config_from_args(parser.parse_args(["serve", *argv]))


def _extra_parsers():
    """Subcommands that live with their feature: sweep (distributed), demo (the RL loop)."""
    from rlserve.bench.sweep import add_sweep_parser
    from rlserve.demo import add_demo_parser
    return [("sweep", add_sweep_parser), ("demo", add_demo_parser)]


if __name__ == "__main__":
    sys.exit(main())
