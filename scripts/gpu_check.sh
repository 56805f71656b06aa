#!/usr/bin/env bash
# The GPU run in one script: TVM from the staged wheels, tvmgroup from this working tree, the
# GPU tests and a non-GPU smoke subset, a quick bench in float32, bfloat16 and float16, a
# max-autotune torch.compile of one shape, a short `tvmgroup tune --target cuda` of one shape,
# then OUTDIR/summary.json and summary.md (scripts/gpu_summary.py), OUTDIR/tuning_logs.tar and
# one OUTDIR/<step>.log per step. docs/gpu.md says how to get it onto a GPU machine.
#
#   bash scripts/gpu_check.sh [--dry-run] OUTDIR
#
# Every step runs under `timeout` with its own limit, capped so that the whole script ends
# within GPU_CHECK_BUDGET_S (default 470 s); a failing step is recorded and the next one runs.
# A dry run gives every step three times its limit.
# --dry-run (or GPU_CHECK_DRY_RUN=1) runs what a CPU can: the same steps with the bench on the
# CPU at a tiny shape, the GPU tests (which skip) of GPU_CHECK_TESTS only, no tuning and no
# torch.compile, and the summary from what the steps wrote.
set -uo pipefail
export PYTHONUNBUFFERED=1

dry_run=${GPU_CHECK_DRY_RUN:-0}
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash scripts/gpu_check.sh [--dry-run] OUTDIR" >&2; exit 2; fi
mkdir -p "$1" || exit 2
out=$(cd "$1" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
work=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$work"
# A dry run shares a small CPU machine with other work: its steps get three times the time.
scale=1; [ "$dry_run" = 1 ] && scale=3
budget=${GPU_CHECK_BUDGET_S:-$(( 470 * scale ))}
summary_reserve=15  # seconds kept for the summary and the tar at the end
started=$(date +%s)
: > "$out/steps.jsonl"

# step NAME LIMIT_S COMMAND: runs COMMAND in bash under `timeout`, its output also in
# OUTDIR/NAME.log, and appends {name, rc, seconds, limit_s} to OUTDIR/steps.jsonl.
step() {
  local name=$1 limit=$(( $2 * scale )) cmd=$3
  local left=$(( budget - summary_reserve - ($(date +%s) - started) ))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  local t0 rc ms
  t0=$(date +%s%N)
  if [ "$limit" -lt 5 ]; then
    echo "no time left for this step" > "$out/$name.log"
    rc=124
  else
    echo "== $name (limit ${limit}s): $cmd"
    timeout -k 10 "$limit" bash -c "$cmd" 2>&1 | tee "$out/$name.log"
    rc=$?
  fi
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '{"name": "%s", "rc": %d, "seconds": %d.%03d, "limit_s": %d}\n' "$name" "$rc" \
    $(( ms / 1000 )) $(( ms % 1000 )) "$limit" >> "$out/steps.jsonl"
  echo "== $name: exit $rc"
}

# A step that does not run here: recorded as skipped (rc -1) with the reason.
skip() {
  echo "skipped: $2" > "$out/$1.log"
  printf '{"name": "%s", "rc": -1, "seconds": 0, "limit_s": 0, "skipped": "%s"}\n' "$1" "$2" >> "$out/steps.jsonl"
}

# -- TVM and tvmgroup ----------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  skip gpuwheels "dry run: the Python environment of the caller provides TVM"
  device=cpu
else
  # stage.sh of the second half installed TVM and wrote env.sh; sourcing it fails loudly on a
  # machine that went cold (then both halves must be staged again).
  # shellcheck disable=SC1091
  if . /root/gpuwheels/env.sh; then echo "gpuwheels: PYTHONPATH=$PYTHONPATH"; else
    echo "gpuwheels: TVM is not installed on this machine: stage .gpuwheels/a and .gpuwheels/b first" >&2
  fi
  device=cuda
  export TVM_CUDA_COMPILE_MODE=${TVM_CUDA_COMPILE_MODE:-nvcc}  # NVRTC is not installed there
fi
export TVMGROUP_HOME=$work/home   # a fresh kernel cache and user-log directory

# tvmgroup from the working tree into a site directory of its own (--no-deps: everything it
# needs is installed or staged; there is no network). Without setuptools there, the package is
# laid out by hand the way pyproject.toml's package-dir maps it. Wheels in .gpuwheels/extra
# (bash scripts/gpu_pack_extra.sh: tqdm, hypothesis) are installed beside it.
site=$work/site
step install 90 "
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target '$site' . ||
  { echo 'pip could not build tvmgroup here; copying the package instead';
    rm -rf '$site/tvmgroup' && mkdir -p '$site' && cp -r tvmgroup '$site/tvmgroup' &&
    cp -r schedules '$site/tvmgroup/schedules' && cp -r tuning_logs '$site/tvmgroup/tuning_logs'; }
  if ls .gpuwheels/extra/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target '$site' .gpuwheels/extra/*.whl
  fi
  PYTHONPATH='$site'\${PYTHONPATH:+:\$PYTHONPATH} python3 -P -c 'import tvmgroup, tvm; print(\"tvmgroup from\", tvmgroup.__file__, \"tvm\", tvm.__version__)'
"
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
# -P: the current directory's ./tvmgroup (no schedules/ inside) must not shadow the installed one.
python="python3 -P"
tvmgroup="$python -m tvmgroup.cli"

step machine 30 "
  nvidia-smi || true
  nvcc --version | tail -2 || true
  python3 -P -c 'import tvm; print(\"tvm\", tvm.__version__, \"cuda device seen by TVM:\", tvm.cuda().exist)' || true
  python3 -P -c 'import torch, sys; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); torch.cuda.is_available() and print(torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
"

# -- tests ------------------------------------------------------------------------------------------
# --continue-on-collection-errors: a test module whose imports are missing there (hypothesis)
# fails alone instead of stopping the run. The tests import the installed package, not ./tvmgroup.
gpu_tests=${GPU_CHECK_TESTS:-tests}
smoke_tests=${GPU_CHECK_SMOKE:-tests/test_bench_device.py tests/test_target.py tests/test_check.py}
step gpu_tests 120 "$python -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
  --junitxml '$out/gpu_tests.xml' $gpu_tests"
step smoke_tests 30 "$python -m pytest -q -m 'not gpu and not slow' -x -p no:cacheprovider \
  --junitxml '$out/smoke_tests.xml' $smoke_tests"

# -- bench ------------------------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
  shapes=${GPU_CHECK_SHAPES:---shape 64,4,8,8}
  formulations=bmm,conv1d,einsum,tvmgroup
else
  # Two (G, K, O) only: tvmgroup compiles three kernels per (G, K, O) and dtype; torch.compile
  # recompiles per shape and dtype, so only the max-autotune step below compiles, at one shape.
  shapes=${GPU_CHECK_SHAPES:---shape 4096,8,64,64 --shape 65536,8,64,64 --shape 65536,8,128,128}
  formulations=linear-loop,conv1d,bmm,einsum,vmap,grouped-mm,tvmgroup
fi
# One step per dtype: one that runs out of time leaves the others' results.
for dtype in float32 bfloat16 float16; do
  step "bench_$dtype" 50 "$tvmgroup bench --device $device --quick --no-chart --threads \$(nproc) \
    --dtype $dtype $shapes --formulations $formulations --output '$out/bench/$dtype'"
done
if [ "$dry_run" = 1 ]; then
  skip bench_autotune "dry run: torch.compile(mode='max-autotune') needs a GPU to be worth its compile time"
  skip tune "dry run: tunes for a GPU"
else
  step bench_autotune 60 "$tvmgroup bench --device cuda --quick --no-chart --dtype bfloat16 \
    --shape 65536,8,64,64 --formulations bmm,autotune-bmm,tvmgroup --output '$out/bench_autotune'"
  # One shape, the forward op, a few trials; builds on every core.
  step tune 80 "$tvmgroup tune --target cuda --groups 8 --in-features 64 --out-features 64 --rows 65536 \
    --dtype bfloat16 --ops forward --trials 16 --batch 16 --output '$work/tuning_logs'"
fi

# -- what comes back -----------------------------------------------------------------------------------
mkdir -p "$work/tuning_logs"
tar -C "$work" -cf "$out/tuning_logs.tar" tuning_logs
timeout 30 python3 "$root/scripts/gpu_summary.py" "$out" 2>&1 | tee "$out/summary.log"
echo "gpu_check: $(( $(date +%s) - started )) s; wrote $out/summary.md"
