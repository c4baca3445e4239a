#!/usr/bin/env bash
# Every check and benchmark that needs a CUDA GPU, on an offline machine, in stages (eval/gpu_setup.md).
#
#   bash eval/gpu_suite.sh STAGE...        from the repository root
#
# Stages (each logs to $LOGS/<stage>.log, default gpu-logs/, is stopped after $STAGE_TIMEOUT seconds,
# default 420, and the suite goes on after a failure; the exit status is that of the last failing stage):
#   deps     build causal-conv1d and mamba-ssm from the source archives in $DEPS (default deps/) for
#            $TORCH_CUDA_ARCH_LIST only (default 9.0: their setup.py files otherwise compile nine
#            architectures, which takes far longer than the one a machine has); a few minutes on 16 cores
#   ext      build the kernels in place (SSM_REDUCE_BUILD_CUDA=1 setup.py build_ext --inplace; about
#            a minute on 16 cores), then `ssm-reduce info`
#   kernels  tests/test_kernels.py and tests/test_ssd_triton.py, then compute-sanitizer's memcheck and racecheck on a small kernel run
#            (SANITIZE=0 skips the sanitizer, which runs the kernels many times slower)
#   mamba    the mamba_ssm adapter tests (needs `deps`), the 2:4 semi-structured test and the
#            pruning solvers on CUDA
#   tests    the whole suite
#   bench    benchkernels, benchprune and speed below
#   benchkernels  eval/bench_kernels.py (the Mamba-2 scan is compared with mamba_ssm's Triton SSD scan,
#            loaded from the unpacked source in $DEPS when mamba_ssm is not built)
#   benchprune    eval/bench_prune.py on CUDA, float32 then bfloat16 weights
#   speed    eval/speed.py --paper on CUDA
#   cpubench eval/bench_prune.py on the machine's CPU with all its cores (the layer-time ratios with
#            more than the 2 threads of the CPU tables; to eval/results/bench_prune_cpu_<N>t.json)
#   pack     eval/results/*.json and the logs into $PACK (default gpu-results.tar.gz)
#
# `deps` may run in the background while `ext` and `kernels` run:
#   bash eval/gpu_suite.sh deps & bash eval/gpu_suite.sh ext kernels ; wait
set -u
SELF=$(realpath "$0")  # (stages run in a child of this script: see the loop at the end)
cd "$(dirname "$SELF")/.." && cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
LOGS=${LOGS:-gpu-logs}
DEPS=${DEPS:-deps}
PACK=${PACK:-gpu-results.tar.gz}
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
STAGE_TIMEOUT=${STAGE_TIMEOUT:-420}
# the kernels are built in place (`ext`), so the scripts and tests import this checkout
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$LOGS"
status=0

log() { echo "[gpu_suite $(date +%H:%M:%S)] $*"; }

# Keep only the architectures of TORCH_CUDA_ARCH_LIST in a package's hard-coded -gencode list.
restrict_archs() {
  "$PY" - "$1" <<'EOF'
import os, re, sys
path = sys.argv[1]
text = open(path).read()
archs = [a.strip().replace(".", "") for a in re.split(r"[ ;]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a.strip()]
flags = ", ".join(f'"-gencode", "arch=compute_{a},code=sm_{a}"' for a in archs)
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
if marker not in text:
    sys.exit(f"{path}: cannot find where to restrict the architectures")
if "restricted by gpu_suite" not in text:
    text = text.replace(marker, f"    cc_flag = [{flags}]  # restricted by gpu_suite\n" + marker, 1)
open(path, "w").write(text)
print(f"{path}: -gencode for sm_{', sm_'.join(archs)} only")
EOF
}

stage_deps() {
  local tmp; tmp=$(mktemp -d)
  for pkg in causal_conv1d mamba_ssm; do
    local archive; archive=$(ls "$DEPS"/${pkg}-*.tar.gz 2>/dev/null | head -n 1)
    if [ -z "$archive" ]; then log "no $DEPS/${pkg}-*.tar.gz"; return 1; fi
    tar xzf "$archive" -C "$tmp" || return 1
    local src; src=$(ls -d "$tmp"/${pkg}-*/ | head -n 1)
    restrict_archs "$src/setup.py" || return 1
    log "building $pkg"
    # at most DEPS_MAX_JOBS (default 8) compiles of 2 nvcc threads each: mamba-ssm's selective-scan
    # sources take several GB each, and `ext` may be compiling beside them
    ( cd "$src" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE NVCC_THREADS=2 MAX_JOBS=${DEPS_MAX_JOBS:-8} \
        "$PY" -m pip install --no-build-isolation --no-deps --no-index . ) || return 1
  done
  "$PY" -c "import causal_conv1d_cuda, selective_scan_cuda, mamba_ssm; print('mamba_ssm', mamba_ssm.__version__, 'imports')"
}

stage_ext() {
  SSM_REDUCE_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace || return 1
  "$PY" -m ssm_reduce.cli info
}

# The unpacked mamba_ssm source whose Triton SSD scan the benchmarks compare with when mamba_ssm is
# not built (it needs no compiled code); unpacked from $DEPS on first use.
mamba_source() {
  local dir; dir=$(ls -d "$DEPS"/mamba_ssm-*/ 2>/dev/null | head -n 1)
  if [ -z "$dir" ]; then
    local archive; archive=$(ls "$DEPS"/mamba_ssm-*.tar.gz 2>/dev/null | head -n 1)
    [ -n "$archive" ] && tar xzf "$archive" -C "$DEPS" && dir=$(ls -d "$DEPS"/mamba_ssm-*/ | head -n 1)
  fi
  echo "${dir%/}"
}

stage_kernels() {
  "$PY" -m pytest -q -rs tests/test_kernels.py tests/test_ssd_triton.py || return 1
  if [ "${SANITIZE:-1}" = 1 ] && command -v compute-sanitizer >/dev/null; then
    for tool in memcheck racecheck; do
      # one small case of each kernel (tails included) under the sanitizer
      timeout 400 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" -m pytest -q -x tests/test_kernels.py \
        -k "(lengths_dtypes and 65) or (test_scan_score_mamba1 and 65) or (test_match and 129) or (test_apply_plan and 127)" \
        || return 1
    done
  fi
}

stage_mamba() {
  "$PY" -m pytest -q -rs tests/test_patch_mamba_ssm.py tests/test_loading.py tests/test_prune.py -k "mamba_ssm or semi or cuda" \
    || return 1
}

stage_tests() { "$PY" -m pytest -q -rs tests; }

stage_benchkernels() {
  SSM_REDUCE_MAMBA_SSM_SOURCE=$(mamba_source) "$PY" eval/bench_kernels.py
}

stage_benchprune() {
  local rc=0
  "$PY" eval/bench_prune.py --device cuda --time-shapes mamba2-130m mamba2-2.7b || rc=1
  "$PY" eval/bench_prune.py --device cuda --time-shapes mamba2-130m mamba2-2.7b --weight-dtype bfloat16 \
    --out eval/results/bench_prune_cuda_bf16.json || rc=1
  return $rc
}

stage_speed() { "$PY" eval/speed.py --device cuda --dtype bfloat16 --paper --shapes mamba2-2.7b mamba-2.8b; }

stage_bench() {
  local rc=0
  stage_benchkernels || rc=1
  stage_benchprune || rc=1
  stage_speed || rc=1
  return $rc
}

stage_cpubench() {
  local threads
  threads=$(nproc)
  OMP_NUM_THREADS=$threads "$PY" eval/bench_prune.py --device cpu --repeats 7 \
    --out "eval/results/bench_prune_cpu_${threads}t.json"
}

stage_pack() {
  tar czf "$PACK" --exclude=pack.log "$LOGS" eval/results
  log "packed $(tar tzf "$PACK" | wc -l) files into $PACK"
}

if [ "${1:-}" = "--one" ]; then "stage_$2"; exit $?; fi
[ $# -gt 0 ] || { sed -n 2,28p "$SELF"; exit 2; }
for stage in "$@"; do
  if ! declare -F "stage_$stage" >/dev/null; then log "unknown stage '$stage'"; status=2; continue; fi
  log "stage $stage"
  start=$SECONDS
  set -o pipefail
  # timeout runs the stage in a process group of its own and stops all of it
  timeout --kill-after=15 "$STAGE_TIMEOUT" bash "$SELF" --one "$stage" 2>&1 | tee "$LOGS/$stage.log"
  rc=$?
  set +o pipefail
  log "stage $stage: exit $rc after $((SECONDS - start)) s"
  [ $rc -eq 0 ] || status=$rc
done
exit $status
