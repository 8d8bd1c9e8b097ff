#!/usr/bin/env bash
# On a 2-GPU device host: install the carried wheels (.whl/common, .whl/trl; see make_wheels.sh) once per
# machine, then run the named steps, logs and JSON under $OUT. Usage: run_on_device.sh STEP...
#   e2e-1.10 | e2e-1.16   TRL's own GRPOTrainer, unchanged, against rlserve serve (http, grpo-unchanged);
#                         E2E_SERVER_ARGS="--num_scheduler_steps=8 ..." passes more flags to the server (one word each;
#                         async scheduling is on by default on CUDA, --async_scheduling=false turns it off)
#   pytest-trl            tests/test_gpu_trl.py with TRL 1.10's client, then 1.16's
#   sync                  sync-medium: rlserve's bucketed path beside TRL's two wire protocols
#   pytest-kernels        sampler / fused-kernel / correctness GPU tests (~25 s)
#   pytest-gpu            tests/test_gpu.py and tests/test_gpu_distributed.py (full log in $OUT/pytest-gpu.txt)
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
P="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade"
if [ ! -e /tmp/site/.done ]; then
  $P --target /tmp/site .whl/common/*.whl >/dev/null 2>&1 && touch /tmp/site/.done
  $P --target /tmp/trl-1.10.0 .whl/trl/trl-1.10.0-*.whl >/dev/null 2>&1
  $P --target /tmp/trl-1.16.0 .whl/trl/trl-1.16.0-*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD
cleanup() { pkill -9 -f "rlserve.cli serve" 2>/dev/null; pkill -9 -f grpo_e2e.py 2>/dev/null; sleep 1; }
trap cleanup EXIT
cleanup  # servers of an earlier call on this machine run in their own sessions and would hold GPU memory
run_step() {
  step=$1
  echo "=== $step $(date +%T)"
  case $step in
    e2e-1.10|e2e-1.16)
      v=${step#e2e-}
      d=/tmp/e2e-$v; rm -rf $d
      sargs=(); for a in ${E2E_SERVER_ARGS:-}; do sargs+=("--server-arg=$a"); done  # one word, one server flag
      tag=$(printf %s "${E2E_SERVER_ARGS:-}" | tr -cs 'A-Za-z0-9.' '-'); tag=${tag#-}; tag=${tag%-}; tag=${tag:+-$tag}
      timeout ${E2E_TIMEOUT:-290} python3 tools/trl_e2e/grpo_e2e.py --trl-path /tmp/trl-$v.0 --repo "$PWD" --out $d \
        --phases ${E2E_PHASES:-http,grpo-unchanged} --timeout ${PHASE_TIMEOUT:-200} "${sargs[@]}" 2>&1 | tail -n 12
      cp $d/results.json "$OUT/e2e-$v$tag.json" 2>/dev/null
      for f in $d/*.log; do echo "##### $f"; grep -v '" 200 \|RECORD line' $f | tail -n 60; done \
        > "$OUT/e2e-$v$tag.logs.txt" ;;
    pytest-trl)
      for v in 1.10 1.16; do
        PYTHONPATH=/tmp/trl-$v.0:$PYTHONPATH timeout 200 python3 -m pytest -q -m gpu tests/test_gpu_trl.py -x \
          -p no:cacheprovider 2>&1 | tail -n 15 | sed "s/^/[trl $v] /"
      done ;;
    sync)
      timeout 280 python3 -m rlserve.bench.sync_bench --output "$OUT/sync-medium.json" 2>&1 | grep -v Warning | tail -n 8 ;;
    pytest-kernels)
      timeout 200 python3 -m pytest -q -m gpu tests/test_sampler_triton.py tests/test_fused.py tests/test_correctness.py \
        -p no:cacheprovider > "$OUT/pytest-kernels.txt" 2>&1; tail -n 15 "$OUT/pytest-kernels.txt" ;;
    pytest-gpu)
      # faulthandler: a test stuck in a collective prints where, instead of a silent cut at the call's limit
      timeout -s INT 400 python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_distributed.py -p no:cacheprovider \
        -o faulthandler_timeout=150 --durations=0 > "$OUT/pytest-gpu.txt" 2>&1; tail -n 25 "$OUT/pytest-gpu.txt" ;;
  esac
}
# One step at a time: each starts a server that sizes its KV cache from the GPU's free memory, so two servers
# started together on one GPU starve each other.
for step in "$@"; do run_step "$step"; done
