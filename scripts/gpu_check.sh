#!/usr/bin/env bash
# The one-call GPU check (issue 14), about 9 minutes on an H100: versions and device, the CUDA tests
# (pytest -m cuda tests/test_cuda.py), then scripts/benchmark.sh's throughput grid in the time left. Writes
# OUT_DIR/gpu_check.json, gpu_check.md, gpu_check.log (every part's output) and OUT_DIR/benchmark/ (4 JSONs,
# 4 profiles, summary.md).
# A part that fails or runs out of time is recorded and the next one runs.
#   bash scripts/gpu_check.sh [--no-benchmark | --no-tests] OUT_DIR [DATA_DIR]
# (two calls, one with each flag, when one call's 10 minutes do not hold both). The device's copy of the checkout
# has no .git: set WS_CODE_VERSION=$(git rev-parse --short HEAD) (its value here) in the command, and every record
# names the commit.
# DATA_DIR: CIFAR-10 as an ImageFolder (default /tmp/c10); made from .carry/cifar10 (a copy of
# ../shared/data/cifar10) when it does not exist. Environment:
#   PYTHON                    the interpreter (default python3)
#   GPU_CHECK_BUDGET          seconds for everything (570); GPU_CHECK_TEST_LIMIT: for the tests (360, or
#                             with --no-benchmark the budget's time left)
#   GPU_CHECK_BENCHMARK=0     as --no-benchmark; GPU_CHECK_TESTS=0 as --no-tests
#   GPU_CHECK_TAR=1           benchmark/ packed as OUT_DIR/benchmark.tgz (a device call returns at most 8 files)
#   BENCHMARK_FLAGS           benchmark.py's own flags (default '--warmup 10 --steps 50')
#   GPU_CHECK_BENCHMARK_ARGS  main.py flags for the benchmark (default '--num_workers 15';
#                             '--device cpu --input_size 32 --batch_size 8 --global_batch_size 8' tries it on
#                             a CPU)
set -uo pipefail
usage='usage: bash scripts/gpu_check.sh [--no-benchmark | --no-tests] OUT_DIR [DATA_DIR]'
case "${1:-}" in
  --no-benchmark) export GPU_CHECK_BENCHMARK=0; shift ;;
  --no-tests) export GPU_CHECK_TESTS=0; shift ;;
  -h|--help) sed -n '2,21p' "$0" | cut -c3-; exit 0 ;;
esac
[ -n "${1:-}" ] || { echo "$usage" >&2; exit 2; }
out=$1
case "$out" in  # an option here is a mistake (mkdir -p would take it as its own)
  -*) echo "gpu_check.sh: unknown option $out; $usage" >&2; exit 2 ;;
esac
data=${2:-/tmp/c10}
start=$(date +%s)
budget=${GPU_CHECK_BUDGET:-570}
export PYTHON=${PYTHON:-$(command -v python3 || command -v python)} PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT  # every part's output is copied into OUT_DIR first
: > "$work/parts.tsv"

part() {  # part NAME LIMIT_SECONDS COMMAND...: run it with its output in WORK/NAME.log; record status and time
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name: $*" | tee "$work/$name.log"
  timeout -k 10 "$limit" "$@" >> "$work/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$work/parts.tsv"
  echo "== $name: exit status $rc"
}
skip() { printf '%s\tskip\t0\t%s\n' "$1" "$2" >> "$work/parts.tsv"; echo "== $1: skipped ($2)"; }
left() { echo $((budget - ($(date +%s) - start))); }

part nvidia_smi 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tail -n +2 "$work/nvidia_smi.log" > "$work/nvidia_smi.txt"
# the CPU loader's 15 workers pass their batches through shared memory (about 4.6 GB at 224 px)
part shared_memory 10 df -h /dev/shm
# torch.compile's Triton builds its launchers with the system's C compiler: without one, compiled runs fail
part c_compiler 10 sh -c 'command -v cc && cc --version | head -n 1'
# ...and Python's headers and libcuda as well: one tiny compiled function says at once whether compiled runs can
# work (and warms the compiler), rather than each compiled test and setting failing after its tracing
part compile_probe 120 "$PYTHON" -c 'import torch, sys
if not torch.cuda.is_available():
    sys.exit(print("no CUDA: skipped"))
print(torch.compile(lambda x: x.sin() + 1)(torch.ones(8, device="cuda")).sum().item(), "compiled on cuda")'
if [ "${GPU_CHECK_TESTS:-1}" = 0 ]; then
  skip cuda_tests '--no-tests'
else
  # with pytest-timeout, a hung test costs 200 s and the others still run (its subprocesses are stopped too);
  # each subprocess has 150 s of its own (test_cuda.LIMIT): a test whose first subprocess hangs reports that
  # one's stderr, but a hang in a later one (the NCCL test runs two torchruns, the resume test three
  # subprocesses) may reach the 200 s first and end as pytest-timeout's failure, without it
  per_test=()
  "$PYTHON" -c 'import pytest_timeout' 2>/dev/null && per_test=(--timeout 200)
  test_limit=360
  [ "${GPU_CHECK_BENCHMARK:-1}" = 0 ] && test_limit=$(($(left) - 20))  # the tests' own call: all of it
  part cuda_tests "${GPU_CHECK_TEST_LIMIT:-$test_limit}" "$PYTHON" -m pytest -m cuda tests/test_cuda.py -v -rfEs \
    -p no:cacheprovider --junitxml "$work/pytest.xml" "${per_test[@]}"
fi
if [ "${GPU_CHECK_BENCHMARK:-1}" = 0 ]; then
  skip benchmark '--no-benchmark'
else
  if [ ! -d "$data/train" ]; then
    if [ -f .carry/cifar10/make_imagefolder.py ]; then
      part imagefolder 120 "$PYTHON" .carry/cifar10/make_imagefolder.py "$data"
    else
      skip imagefolder "no $data/train and no .carry/cifar10 (cp -r ../shared/data/cifar10 .carry/)"
    fi
  fi
  if [ ! -d "$data/train" ]; then
    skip benchmark "no ImageFolder at $data"
  elif [ "$(left)" -lt 90 ]; then
    skip benchmark "$(left) s left of the ${budget} s budget"
  else
    export BENCHMARK_FLAGS=${BENCHMARK_FLAGS:---warmup 10 --steps 50}
    part benchmark $(($(left) - 20)) bash scripts/benchmark.sh "$data" "$out/benchmark" \
      ${GPU_CHECK_BENCHMARK_ARGS:---num_workers 15}
  fi
fi
echo $(($(date +%s) - start)) > "$work/elapsed"
cat "$work"/nvidia_smi.log "$work"/shared_memory.log "$work"/c_compiler.log "$work"/compile_probe.log "$work"/cuda_tests.log "$work"/imagefolder.log "$work"/benchmark.log \
  > "$out/gpu_check.log" 2>/dev/null
"$PYTHON" scripts/gpu_report.py "$out" "$work"
rc=$?
# GPU_CHECK_TAR=1: benchmark/ (up to 9 files) as one benchmark.tgz, for a device call that returns 8 files at most
if [ "${GPU_CHECK_TAR:-0}" = 1 ] && [ -d "$out/benchmark" ]; then
  tar -czf "$out/benchmark.tgz" -C "$out" benchmark && rm -rf "$out/benchmark"
fi
exit $rc
