#!/usr/bin/env bash
# Speed figures on a 2-GPU device host, one step at a time, logs and JSON under $OUT. The wheels of
# tools/trl_e2e/make_wheels.sh are carried in .whl/common (installed once per machine into /tmp/site); Ray's
# (make_ray_wheels.sh) in three calls, each within the machine's 30 s warm window of the last:
#   carry [.whl/common, .whl/ray/c1]: ray-stage | carry [.whl/ray/c2]: ray-stage | carry [.whl/ray/c3]: ray-stage
#   ray-install ray-vs-local
# vLLM 0.26 for the side-by-side figures (../shared/tools/vllm-wheelhouse.sh .whl/vllm: parts c1..cN of <= 61 MB)
# the same way, one part per call: carry [.whl/vllm/cK]: vllm-stage ..., then vllm-install vs-vllm-small ...
# The device's .git can be older than the tree it runs: name the commit from this machine (RLSERVE_COMMIT=<sha>
# written out in the command, not $(git rev-parse) run there), or the JSON records the stale one (+ -dirty).
# Usage: run_on_device.sh STEP...
#   bench-small|bench-7b  rlserve bench --workload rl-small|rl-7b --modes seeded,plain (transformers beside it)
#   async-small|async-7b  the same without transformers, --async_scheduling off then on (issue 15's overlap), and
#                         pytest -m gpu on test_gpu.py's async test (no hidden host sync in launch, = sync tokens)
#   dp-scaling            rl-small through the server: DP=1 (with offline) and DP=2, same request (fixed work), 5 runs
#                         each (DP_REPEATS), every run with each replica's steps, seconds in them and GC seconds
#   dp-diag               what bounds DP=2: offline rl-small with 64 and 32 prompts (a DP=2 replica's half), sync and
#                         --async_scheduling; two offline 32-prompt engines at once, one per GPU (DP=2 without the
#                         API process); the server at DP=2 with --async_scheduling
#   ray-stage             copy the Ray parts this call carries to /tmp/raywh
#   ray-install           put Ray's wheel together and install it into /tmp/ray-site
#   ray-vs-local          rl-small through the server, DP=2: local and Ray replicas (one-node cluster), alternated twice
#   gpu-kernels           pytest -m gpu: gpu-decode (the Triton decode-attention tests, ~400 s), then gpu-rest (the
#                         sampler tests, tests/test_gpu.py): together more than one call's 600 s, so one step a call
#   decode-sweep          decode attention alone at the rl-7b / rl-small shapes over launch configs
#   profile-small|profile-7b  one decode step split by phase (profile_step), torch.profiler's top CUDA operators
#   sweep-7b|sweep-32b    rlserve sweep --gpus 2 on rl-7b / rl-32b (TP=1, TP=2, DP=2 where it fits)
#   vllm-stage            copy the vLLM parts this call carries to /tmp/vllmwh
#   vllm-install          put vLLM's wheel together and install it with its extras into /tmp/vllm-site
#   vs-vllm-small|vs-vllm-medium|vs-vllm-7b   rlserve bench --against vllm, seeded and plain, no transformers
#                         (rlserve with --async_scheduling, VS_ASYNC=0 without; VS_STEPS=K: --num_scheduler_steps K;
#                         VS_ROUNDS=N: N rounds taking turns, medians and each round's ratio)
#   gemm-shapes           the 7B and 0.5B decode matmuls alone (M = 256, 512), cuBLAS against cuBLASLt
#   onewarp-ab            rl-7b and rl-small (K=8, async): decode attention without one-warp programs (patched off),
#                         then the default, alternated twice (ONEWARP_WORKLOADS, ONEWARP_ROUNDS pick others)
#   multistep-dump        multistep_dump.py: where K=1 and K=8 part, forward by forward, under DUMP_CONFIGS (32-key
#                         tiles with CUDA graphs, 64-key ones, 32-key tiles eager)
#   decode-wide           decode_sweep.py --wide at rl-7b context 786: 1-2 warps, 16-64-key tiles, 1/3/4 splits
#   decode-candidates     decode_sweep.py --candidates: a few decode configs at seven shapes, each over splits
#   multistep-warm        multistep_dump.py --warm: a K=1 run against the same prompts again on a warm prefix cache
#   timeline-7b           timeline.py: GPU busy and idle time per rl-7b decode step (K=8, async), idle gaps by kernel
#   gemm-triton           pytest -m gpu on tests/test_triton_gemm.py, then gemm-shapes' QKV, O and down with the
#                         split-K Triton GEMM's configs beside cuBLAS (tools/device_bench/triton_gemm.py)
#   blas-7b               rl-7b (K=8) with cuBLAS, then with cuBLASLt preferred for every matmul, twice alternated
#   patch-ab              PATCH=MODULE.ATTR, PATCH_VALUES="A B" (Python literals): rlserve bench (K=8, async) with each
#                         value patched in (bench_patched.py), alternated PATCH_ROUNDS times (2) over PATCH_WORKLOADS
#                         (rl-7b); JSON WORKLOAD-ATTR-VALUE-ROUND.json
#   kv-gather             kv_gather_probe.py: decode attention against kernels that only read its K/V tiles the same
#                         way (in registers, and through shared memory into products), and a copy: read- or work-bound?
#   shared-prefix         shared_prefix_probe.py: decode attention with and without the shared-prefix pass, the pass
#                         alone at several configs, and the decode over each row's own keys only
#   layer-gemms           layer_gemms.py: 28 layers of the 7B decoder's linear chain in a CUDA graph, per weight layout
#                         and BLAS library (LAYER_VARIANTS picks), µs per layer, kernels and idle gaps
#   steps-small|steps-medium|steps-7b  rlserve bench --async_scheduling, --num_scheduler_steps 1 then 8, twice
#                         alternated (STEPS_LIST="1 8", STEPS_ROUNDS=2 pick others), seeded and plain, no baseline
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl/common ] && [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/common/*.whl >/dev/null 2>&1 \
    && touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:/tmp/ray-site:$PWD
cleanup() {
  pkill -9 -f "rlserve.cli serve" 2>/dev/null; python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1
  [ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
}
trap cleanup EXIT
ab_7b() {  # ab_7b VAR TAG: rl-7b (K=8, async) with VAR=0 then VAR=1, twice alternated, JSON rl-7b-TAG{0,1}-{1,2}
  for round in 1 2; do
    for value in 0 1; do
      env "$1=$value" timeout 200 python3 -m rlserve.cli bench --workload rl-7b --modes seeded,plain --no_baseline \
        --num_scheduler_steps 8 --output "$OUT/rl-7b-$2$value-$round.json" 2>&1 | grep "rlserve" | sed "s/^/[$2=$value] /"
    done
  done
}
run_step() {
  echo "=== $1 $(date +%T)"
  case $1 in
    bench-small|bench-7b)
      w=rl-${1#bench-}
      timeout 560 python3 -m rlserve.cli bench --workload "$w" --modes seeded,plain --output "$OUT/$w.json" 2>&1 | tail -n 25 ;;
    async-small|async-7b)
      w=rl-${1#async-}
      timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -k async_scheduling -p no:cacheprovider 2>&1 | tail -n 3
      for flag in --async_scheduling=false --async_scheduling; do  # the default on CUDA is async: sync by name
        timeout 280 python3 -m rlserve.cli bench --workload "$w" --modes seeded,plain --no_baseline $flag \
          --output "$OUT/$w$([ "$flag" = --async_scheduling ] && echo -async).json" 2>&1 | tail -n 8
      done ;;
    dp-scaling)
      # fixed work (one 64 x 8 batch) at DP=1 and DP=2, 5 runs each (every run kept, with each replica's steps,
      # seconds inside them and GC seconds during it): --async_scheduling, then sync; DP_CONFIGS picks others
      # ("DP:FLAGS;DP:FLAGS", FLAGS may hold spaces)
      # (DP_PROMPTS=128: the scaled view, 2x the prompts)
      bench="python3 -m rlserve.cli bench --workload rl-small --through_server --repeats ${DP_REPEATS:-5}"
      [ -n "${DP_PROMPTS:-}" ] && bench="$bench --num_prompts $DP_PROMPTS"
      IFS=';' read -ra cfgs <<< "${DP_CONFIGS:-1:--async_scheduling;2:--async_scheduling;1:--async_scheduling=false;2:--async_scheduling=false}"
      for cfg in "${cfgs[@]}"; do
        dp=${cfg%%:*}; a=${cfg#*:}; tag=$(printf %s "$a" | tr -cs 'A-Za-z0-9.' '-'); tag=${tag#-}; tag=${tag%-}
        timeout 200 $bench --data_parallel_size "$dp" --server_args="--log_level warning $a" \
          --output "$OUT/rl-small-server-dp$dp${tag:+-$tag}${DP_PROMPTS:+-p$DP_PROMPTS}.json" 2>&1 | grep "offline\|server /gen"
      done ;;
    dp-diag)
      for flag in --async_scheduling=false --async_scheduling; do
        for np in 64 32; do
          timeout 150 python3 -m rlserve.cli bench --workload rl-small --modes seeded --no_baseline --num_prompts $np \
            $flag --output "$OUT/diag-offline-p$np$([ "$flag" = --async_scheduling ] && echo -async).json" 2>&1 | grep "rlserve "
        done
      done
      for g in 0 1; do
        CUDA_VISIBLE_DEVICES=$g timeout 150 python3 -m rlserve.cli bench --workload rl-small --modes seeded \
          --no_baseline --num_prompts 32 --output "$OUT/diag-pair-gpu$g.json" > "$OUT/diag-pair-gpu$g.txt" 2>&1 &
      done
      wait; grep -h "rlserve " "$OUT"/diag-pair-gpu*.txt
      timeout 200 python3 -m rlserve.cli bench --workload rl-small --through_server --data_parallel_size 2 --repeats 2 \
        --server_args "--async_scheduling" --output "$OUT/rl-small-server-dp2-async.json" 2>&1 | tail -n 8 ;;
    ray-stage) mkdir -p /tmp/raywh && cp .whl/ray/c*/* /tmp/raywh/ && ls /tmp/raywh ;;
    ray-install)
      cat /tmp/raywh/rpart-* > /tmp/raywh/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl && rm /tmp/raywh/rpart-* \
        && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ray-site /tmp/raywh/*.whl 2>&1 \
        | tail -n 3; python3 -c "import ray; print('ray', ray.__version__)" ;;
    ray-vs-local)
      # local and Ray replicas alternated twice (a slow spell of the host does not land on one side only), 3 runs
      # each time; the JSON keeps every run and the median
      python3 -m ray.scripts.scripts start --head --num-gpus 2 --disable-usage-stats --include-dashboard=false \
        > "$OUT/ray-start.txt" 2>&1
      for round in 1 2; do
        for side in local ray; do
          args="--log_level warning"; [ $side = ray ] && args="$args --ray_address auto"
          timeout 140 python3 -m rlserve.cli bench --workload rl-small --through_server --data_parallel_size 2 \
            --repeats 3 --server_args="$args" --output "$OUT/rl-small-server-dp2-$side-$round.json" 2>&1 \
            | grep "server /gen"
        done
      done
      python3 -m ray.scripts.scripts stop --force >/dev/null 2>&1 ;;
    vllm-stage) mkdir -p /tmp/vllmwh && cp .whl/vllm/c*/* /tmp/vllmwh/ && ls /tmp/vllmwh | wc -l ;;
    vllm-install)
      cat /tmp/vllmwh/vpart-* > /tmp/vllmwh/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm /tmp/vllmwh/vpart-* \
        && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/vllm-site /tmp/vllmwh/*.whl 2>&1 \
        | tail -n 3; PYTHONPATH=/tmp/vllm-site:$PYTHONPATH python3 -c "import vllm; print('vllm', vllm.__version__)" ;;
    vs-vllm-small|vs-vllm-medium|vs-vllm-7b)
      w=rl-${1#vs-vllm-}; async=--async_scheduling; [ "${VS_ASYNC:-1}" = 0 ] && async=--async_scheduling=false
      steps=${VS_STEPS:-1}
      PYTHONPATH=/tmp/vllm-site:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 timeout 560 python3 -m rlserve.cli bench \
        --workload "$w" --modes seeded,plain --no_baseline --against vllm $async --num_scheduler_steps "$steps" \
        --rounds "${VS_ROUNDS:-1}" \
        --output "$OUT/$w-vs-vllm$([ "$async" = --async_scheduling ] && echo -async)-steps$steps.json" 2>&1 | tail -n 20 ;;
    steps-small|steps-medium|steps-7b)
      w=rl-${1#steps-}
      for round in $(seq "${STEPS_ROUNDS:-2}"); do
        for k in ${STEPS_LIST:-1 8}; do
          timeout 280 python3 -m rlserve.cli bench --workload "$w" --modes seeded,plain --no_baseline --async_scheduling \
            --num_scheduler_steps "$k" --output "$OUT/$w-async-steps$k-$round.json" 2>&1 | grep "rlserve" | sed "s/^/[K=$k] /"
        done
      done ;;
    gemm-shapes)
      timeout 200 python3 tools/device_bench/gemm_shapes.py --out "$OUT" 2>&1 | tail -n 22 ;;
    onewarp-ab)
      for round in $(seq "${ONEWARP_ROUNDS:-2}"); do
        for w in ${ONEWARP_WORKLOADS:-rl-7b rl-small}; do
          for min in 1073741824 default; do
            patch=()
            [ "$min" = default ] || patch=("rlserve.attention.triton_paged._ONE_WARP_MIN_PROGRAMS_PER_SM=$min")
            tag=$([ "$min" = default ] && echo onewarp || echo fourwarps)
            timeout 200 python3 tools/device_bench/bench_patched.py ${patch[@]+"${patch[@]}"} -- bench --workload "$w" \
              --modes seeded,plain --no_baseline --num_scheduler_steps 8 --output "$OUT/$w-$tag-$round.json" 2>&1 \
              | grep "rlserve" | sed "s/^/[$w $tag $round] /"
          done
        done
      done ;;
    multistep-dump)
      for spec in ${DUMP_CONFIGS:-32:1:2 64:4:3 32:1:2,--eager}; do
        timeout 120 python3 tools/device_bench/multistep_dump.py ${spec/,/ } 2>&1 | grep -v Warn | tail -n 6
      done ;;
    decode-wide)
      timeout 400 python3 tools/device_bench/decode_sweep.py --out "$OUT" --wide --shapes rl-7b-ctx786 2>&1 \
        | grep -v Warning | tail -n 14 ;;
    decode-candidates)
      timeout 500 python3 tools/device_bench/decode_sweep.py --out "$OUT" --candidates 2>&1 | grep -v Warning | tail -n 12 ;;
    multistep-warm)
      for spec in ${DUMP_CONFIGS:-32:1:2 64:4:3}; do
        timeout 120 python3 tools/device_bench/multistep_dump.py $spec --warm 2>&1 | grep -v Warn | tail -n 6
      done ;;
    patch-ab)
      : "${PATCH:?patch-ab needs PATCH=MODULE.ATTR}"
      for round in $(seq "${PATCH_ROUNDS:-2}"); do
        for w in ${PATCH_WORKLOADS:-rl-7b}; do
          for value in ${PATCH_VALUES:-False True}; do
            timeout 200 python3 tools/device_bench/bench_patched.py "$PATCH=$value" -- bench --workload "$w" \
              --modes seeded,plain --no_baseline --num_scheduler_steps 8 \
              --output "$OUT/$w-${PATCH##*.}-$value-$round.json" \
              2>&1 | grep "rlserve\|Error\|rror:" | sed "s/^/[$w ${PATCH##*.}=$value $round] /"
          done
        done
      done ;;
    shared-prefix)
      timeout 300 python3 tools/device_bench/shared_prefix_probe.py --out "$OUT" 2>&1 | grep -v Warn | tail -n 80 ;;
    kv-gather)
      timeout 300 python3 tools/device_bench/kv_gather_probe.py --out "$OUT" 2>&1 | grep -v Warn | tail -n 40 ;;
    layer-gemms)
      timeout 400 python3 tools/device_bench/layer_gemms.py --out "$OUT" ${LAYER_VARIANTS:+--variants $LAYER_VARIANTS} \
        2>&1 | grep -v Warn | tail -n 120 ;;
    timeline-7b)
      timeout 300 python3 tools/device_bench/timeline.py --workload rl-7b --out "$OUT" 2>&1 | grep -v Warn | tail -n 40 ;;
    gemm-triton)
      timeout 200 python3 -m pytest -q -m gpu tests/test_triton_gemm.py -p no:cacheprovider 2>&1 | tail -n 3
      timeout 300 python3 tools/device_bench/gemm_shapes.py --out "$OUT" --triton --layers qkv,o,down \
        --models "${GEMM_MODELS:-7b}" --tokens "${GEMM_TOKENS:-256}" 2>&1 | tail -n 40 ;;
    blas-7b)
      # cuBLAS against cuBLASLt for every matmul (TORCH_BLAS_PREFER_CUBLASLT=1), alternated twice, rl-7b with K=8
      # (async on: the default): the 7B step is GEMM-bound, and QKV/O ran at 47-52% of the dense peak (seventh session)
      ab_7b TORCH_BLAS_PREFER_CUBLASLT cublaslt ;;
    gpu-kernels)
      run_step gpu-decode; run_step gpu-rest ;;
    gpu-decode)
      # (-k applies to every path of a pytest line: the decode selection runs alone; 684 cases, each under both
      # launch configs (fp32 and head dim 256 skip the one-warp one), so this step fills most of a call)
      timeout 400 python3 -m pytest -q -m gpu tests/test_triton_attention.py -k decode -p no:cacheprovider 2>&1 \
        | tail -n 3 ;;
    gpu-rest)
      timeout 250 python3 -m pytest -q -m gpu tests/test_sampler_triton.py tests/test_gpu.py -p no:cacheprovider 2>&1 \
        | tail -n 8 ;;
    decode-sweep)
      timeout 400 python3 tools/device_bench/decode_sweep.py --out "$OUT" 2>&1 | grep -v Warning | tail -n 20 ;;
    profile-small|profile-7b)
      # where a decode step's time goes (the engine's own step with timing hooks), and torch.profiler's top
      # operators by CUDA time (the Chrome trace stays on the machine: too large to come back)
      # (PROFILE_WARM=N: N decode steps first, a longer context)
      w=rl-${1#profile-}
      # (PROFILE_PROMPTS=N: N prompts, e.g. a DP=2 replica's half)
      rm -rf /tmp/prof-$w  # tables of an earlier call on this machine would come back too
      timeout 300 python3 -m rlserve.bench.profile_step --workload "$w" --warm_steps "${PROFILE_WARM:-0}" \
        ${PROFILE_PROMPTS:+--num_prompts $PROFILE_PROMPTS} --output "$OUT/profile-$w${PROFILE_PROMPTS:+-p$PROFILE_PROMPTS}.json" \
        --torch_profiler /tmp/prof-$w 2>&1 | tail -n 30
      cp /tmp/prof-$w/ops-*.txt "$OUT/" 2>/dev/null ;;
    sweep-7b|sweep-32b)
      w=rl-${1#sweep-}
      timeout 560 python3 -m rlserve.cli sweep --gpus 2 --workload "$w" --output_dir "$OUT/sweep-$w" 2>&1 | tail -n 15 ;;
    *) echo "unknown step $1"; return 2 ;;
  esac
}
# The GPUs' SM clock, power and throttle reasons every 200 ms while the steps run (a 700 W cap pulled the clocks down
# under the 7B GEMMs in the seventh session; a slow run can then be told from a throttled one): $OUT/gpu-clocks.csv
if command -v nvidia-smi >/dev/null; then
  fields=timestamp,index,clocks.sm,power.draw,temperature.gpu,utilization.gpu
  fields=$fields,clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown
  nvidia-smi --query-gpu=$fields --format=csv -lms 200 > "$OUT/gpu-clocks.csv" 2>/dev/null &
  smi=$!
fi
for step in "$@"; do echo "$(date +%T.%N) $step" >> "$OUT/steps.txt"; run_step "$step"; done
[ -n "${smi:-}" ] && kill "$smi" 2>/dev/null
