#!/usr/bin/env bash
# Everything the fused kernels need checked on a CUDA machine, in one run, each stage under its own
# time limit so that one stuck stage does not cost the others:
#
#   bench    bench/kernels.py at B in 1, 8, 32 and T in 4k, 64k (kernel, eager, torch.compile, fla),
#            as OUTDIR/kernels.json (committed as bench/results/kernels-<gpu>.json)
#   tests    tests/test_kernels.py compiled on the GPU, the gpu-marked real-shape tests included, and
#            whether cuBLAS keeps a row's bits whatever the row count (what spans need on a GPU)
#   cases    bench/kernel_case.py: every depth, optimizer and dtype at the serving shapes, each in a
#            process of its own (an illegal access fails one case, not every test after it), as
#            OUTDIR/cases.jsonl
#   sweep    bench/kernels.py --sweep at B=8, T=4k: eight tunings (num_warps, block_e, ns_block, ns_gram)
#   profile  Nsight Compute on one launch of the chunk kernel (B=8, T=4k), if ncu is there: its
#            details page in OUTDIR/profile.log
#   ingest   bench/ingest.py on CUDA with the default model, ATLAS_KERNELS=on against =off
#
#   bench/gpu_check.sh [OUTDIR]                 # bench, tests, cases; OUTDIR default /tmp/gpu-check
#   STAGES="sweep profile" bench/gpu_check.sh /tmp/out
#
# The default stages take about 11 minutes at most (limits BENCH_LIMIT=360 s, TESTS_LIMIT=200 s,
# CASES_LIMIT=120 s; on an H200 they took 112, 153 and 10 s); the
# benchmark rewrites its JSON after every row, so a stage cut short still leaves what it measured.
#
# On a host with no package index, put the wheels of bench/wheelhouse.sh in .whl (or WHEELS=dir):
# they are installed into a private folder put first on PYTHONPATH, beside the project itself,
# so the image's own packages are left as they are.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/gpu-check}
stages=${STAGES:-bench tests cases}
wheels=${WHEELS:-.whl}
site=${SITE:-/tmp/atlas-site}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/atlas-triton-cache}

if [ -d "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl || exit 1
fi
# The project as the `atlas` namespace (pyproject's package-dir), linked to this checkout: nothing to
# build, and the code that runs is the code here.
mkdir -p "$site/atlas"
for part in engine kernels server training; do
  [ -d "$part" ] && ln -sfn "$PWD/$part" "$site/atlas/$part"
done
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu_check.sh needs a CUDA GPU; none found (on CPU: pytest -q -k kernel)" >&2
  exit 2
fi

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  python3 -c "import fla; print('fla', fla.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$out/machine.txt"

declare -A status
run_stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  status[$name]="rc=$rc in $((SECONDS - t0))s"
  tail -n 25 "$out/$name.log"
}

for stage in $stages; do
  case $stage in
    bench) run_stage bench "${BENCH_LIMIT:-360}" python3 bench/kernels.py --out "$out/kernels.json" ;;
    tests) xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 8)
           run_stage tests "${TESTS_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider "${xdist[@]}" \
             tests/test_kernels.py \
             tests/test_model_invariance.py::test_cuda_products_keep_a_rows_bits_whatever_the_row_count ;;
    cases) run_stage cases "${CASES_LIMIT:-120}" bash -c '
             for depth in 1 2; do for opt in gd momentum muon; do for dtype in fp32 bf16; do
               python3 bench/kernel_case.py --depth $depth --opt $opt --dtype $dtype &
             done; done; done; wait'
           grep "^{" "$out/cases.log" > "$out/cases.jsonl"
           status[cases]="${status[cases]}, $(grep -c '"error"' "$out/cases.jsonl") of $(wc -l < "$out/cases.jsonl") failed" ;;
    sweep) run_stage sweep "${SWEEP_LIMIT:-180}" python3 bench/kernels.py --batches 8 --lengths 4k --sweep \
             --no-compile --no-fla --out "$out/kernels-sweep.json" ;;
    profile) ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
             if [ -n "$ncu" ]; then
               run_stage profile "${PROFILE_LIMIT:-240}" "$ncu" --clock-control none --set full --page details -k regex:_scan2 \
                 -c 1 python3 bench/kernels.py --batches 8 --lengths 4k --reps 1 --ref-chunks 1 \
                 --no-compile --no-fla --out "$out/kernels-profiled.json"
             else status[profile]="no ncu"; fi ;;
    ingest) for mode in on off; do
              ATLAS_KERNELS=$mode run_stage "ingest-kernels-$mode" "${INGEST_LIMIT:-150}" python3 bench/ingest.py \
                --device cuda --lengths 4096,65536 --time-budget $(( ${INGEST_LIMIT:-150} * 6 / 10 )) --out "$out/ingest-kernels-$mode.json"
              status[ingest]="${status[ingest]:-}${status[ingest]:+, }$mode ${status[ingest-kernels-$mode]}"
            done ;;
    *) echo "unknown stage $stage"; status[$stage]="unknown" ;;
  esac
done

echo "== summary"
for stage in $stages; do echo "$stage: ${status[$stage]:-not run}"; done
[ -f "$out/tests.log" ] && tail -n 1 "$out/tests.log"
[ -f "$out/bench.log" ] && sed -n '/^== table/,$p' "$out/bench.log"
