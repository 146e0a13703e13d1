#!/usr/bin/env bash
# GPU checks and benchmarks in one command on the device machine (see README, "GPU benchmarks").
#
#   scripts/gpu_bench.sh part1   # CUDA kernel parity tests, benchmarks.kernels, sparse_conv, attention,
#                                # then the kernel/sparse/model unit tests (CPU)              ~8.5 min max
#   scripts/gpu_bench.sh part2   # full-size random-weight pipeline: write it, 512 + 1024_cascade,
#                                # 1024_cascade --low-vram                                      ~8.5 min max
#   scripts/gpu_bench.sh all     # both (more than one device call's 10 minutes)
# Options: --dry-run (print the commands, run nothing), --smoke (tiny sizes on the CPU: checks every
# command line here). Environment: PY (python3), GPU_BENCH_DEVICE (cuda; cpu with --smoke), OUT (results
# folder, /tmp/gpu_bench by default), BUDGET_S (seconds per part, 510), MODEL_DIR (/tmp/trellis_full).
# Needs `scripts/gpu_wheels.sh` run beforehand and `.whl` + `.gpu_shared` (+ `.whl_spconv` if made) carried:
# the wheels are installed into /tmp/site, TRELLIS_SHARED points at .gpu_shared. Every step has its own timeout; a
# failing step is logged and the next one runs. Writes $OUT/<part>.log, $OUT/<part>_summary.json
# (step, rc, seconds) and $OUT/kernels.json.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_bench}
BUDGET_S=${BUDGET_S:-510}
MODEL_DIR=${MODEL_DIR:-/tmp/trellis_full}
DRY=0; SMOKE=0; PARTS=()
for a in "$@"; do
    case "$a" in
        --dry-run) DRY=1 ;;
        --smoke) SMOKE=1 ;;
        part1|part2) PARTS+=("$a") ;;
        all) PARTS+=(part1 part2) ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "unknown argument $a" >&2; exit 2 ;;
    esac
done
[ ${#PARTS[@]} -gt 0 ] || PARTS=(part1 part2)
if [ "$SMOKE" = 1 ]; then DEV=${GPU_BENCH_DEVICE:-cpu}; MODEL_DIR=${TMPDIR:-/tmp}/gpu_bench_smoke_model; else DEV=${GPU_BENCH_DEVICE:-cuda}; fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY DEV

# ---- environment: wheels into /tmp/site (device README), shared data from .gpu_shared ----------------
if [ "$DRY" = 0 ] && [ "$SMOKE" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "WARNING: wheel install failed" >&2
    if ls .whl_spconv/*.tar.xz >/dev/null 2>&1; then  # optional spconv (scripts/gpu_wheels.sh --spconv)
        # into its own folder: on PYTHONPATH only once the spconv_check step has run a conv on the GPU
        "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site_spconv', filter='tar')" \
            .whl_spconv/*.tar.xz && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site_spconv .whl_spconv/*.whl || echo "WARNING: spconv install failed" >&2
    fi
    export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -z "${TRELLIS_SHARED:-}" ] && [ ! -d ../shared ] && [ -d .gpu_shared ]; then export TRELLIS_SHARED=$REPO/.gpu_shared; fi

# ---- step runner -------------------------------------------------------------------------------------
LOG=; SUMMARY=(); T_PART=0; LAST_RC=
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 t=$2; shift 2
    local left=$((BUDGET_S - (SECONDS - T_PART)))
    if [ "$DRY" = 1 ]; then echo "[$name] timeout ${t}s: $*"; return; fi
    { echo; echo "===== [$name] $(date -u +%H:%M:%S) timeout ${t}s (part budget left ${left}s): $*"; } | tee -a "$LOG"
    if [ "$left" -lt 20 ]; then
        echo "===== [$name] SKIPPED: part budget spent" | tee -a "$LOG"; SUMMARY+=("$name skipped 0"); return
    fi
    [ "$t" -le "$left" ] || t=$left
    local t0=$SECONDS
    if declare -F "$1" >/dev/null; then  # a shell function: run it in a child bash so that timeout applies
        timeout -k 10 "$t" bash -c "$(declare -f "$1"); $*" 2>&1 | tee -a "$LOG"
    else
        timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
    fi
    local rc=${PIPESTATUS[0]} dt=$((SECONDS - t0)); LAST_RC=$rc
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "===== [$name] TIMED OUT after ${t}s" | tee -a "$LOG"
    echo "===== [$name] rc=$rc ${dt}s" | tee -a "$LOG"
    SUMMARY+=("$name $rc $dt")
}
finish() {  # finish PART: table in the log, JSON next to it
    local part=$1 first=1
    [ "$DRY" = 1 ] && return
    { echo; echo "===== summary $part (device $DEV)"; printf '%-22s %8s %6s\n' step rc seconds
      for s in "${SUMMARY[@]}"; do printf '%-22s %8s %6s\n' $s; done; } | tee -a "$LOG"
    { echo "{\"part\": \"$part\", \"device\": \"$DEV\", \"smoke\": $SMOKE, \"steps\": ["
      for s in "${SUMMARY[@]}"; do
          set -- $s; [ $first = 1 ] || echo ","; first=0
          printf '  {"step": "%s", "rc": "%s", "seconds": %s}' "$1" "$2" "$3"
      done; echo; echo "]}"; } > "$OUT/${part}_summary.json"
}
envinfo() {
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv || echo "no nvidia-smi"
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); \
import triton; print('triton', triton.__version__)"
    "$PY" -c "import trimesh, xatlas, fast_simplification; print('trimesh', trimesh.__version__)"
    "$PY" -c "import spconv; print('spconv', spconv.__version__)" 2>/dev/null || echo "spconv: not installed (optional)"
    echo "TRELLIS_SHARED=${TRELLIS_SHARED:-../shared} PYTHONPATH=$PYTHONPATH"
}

SPCONV_CHECK='import time, torch, spconv, spconv.pytorch as sp
t = time.perf_counter()
c = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.int32, device="cuda")
x = sp.SparseConvTensor(torch.randn(4, 16, device="cuda", dtype=torch.float16), c, [4, 4, 4], 1)
y = sp.SubMConv3d(16, 32, 3, indice_key="k").cuda().half()(x)
torch.cuda.synchronize()
print("spconv", spconv.__version__, "SubMConv3d ok", tuple(y.features.shape), f"{time.perf_counter() - t:.1f}s")'

# sizes: GPU (issue-8 targets) vs --smoke (smallest that exercises every flag)
if [ "$SMOKE" = 1 ]; then
    KERN_ARGS=(--quick --reps 1); SC_ARGS=(--dtype float32 --sizes 2000 --channels 8 --reps 1 --stage-voxels 2000)
    ATT_ARGS=(--quick --reps 1); FULL_ARGS=(--tiny-configs --steps 2 2 2); PIPE_REPEAT=1
    REMBG_ARGS=(--tiny --reps 1)
    CPU_TESTS=(--collect-only)
else
    KERN_ARGS=(--reps 5); SC_ARGS=(--dtype float16 --sizes 100000 1000000 --channels 64 256 --reps 5)
    ATT_ARGS=(--reps 5); FULL_ARGS=(); PIPE_REPEAT=2
    REMBG_ARGS=(--dtype fp16 --reps 5)
    CPU_TESTS=(-x); "$PY" -c "import xdist" 2>/dev/null && CPU_TESTS+=(-n 8)
fi

for part in "${PARTS[@]}"; do
    LOG=$OUT/$part.log; SUMMARY=(); T_PART=$SECONDS
    [ "$DRY" = 1 ] || : > "$LOG"
    step env 60 envinfo
    if [ "$part" = part1 ]; then
        # (a) compiled-kernel parity on the GPU (own process: the interpreter tests set TRITON_INTERPRET=1)
        step tests_cuda 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py
        # optional spconv (cu126 build beside the cu130 torch): only used by the benchmarks if a conv runs
        if [ -d /tmp/site_spconv ] || { [ "$DRY" = 1 ] && [ -d .whl_spconv ]; }; then
            step spconv_check 90 env PYTHONPATH="/tmp/site_spconv:$PYTHONPATH" "$PY" -c "$SPCONV_CHECK"
            [ "$LAST_RC" = 0 ] && export PYTHONPATH=/tmp/site_spconv:$PYTHONPATH
        fi
        # (b)-(d) benchmarks
        step kernels 150 "$PY" -m benchmarks.kernels --device "$DEV" "${KERN_ARGS[@]}" --json "$OUT/kernels.json"
        step sparse_conv 90 "$PY" -m benchmarks.sparse_conv --device "$DEV" "${SC_ARGS[@]}"
        step attention 90 "$PY" benchmarks/attention.py --device "$DEV" --dtype bfloat16 "${ATT_ARGS[@]}"
        # background removal at 1024² (Swin-L size, recipe weights; target <= 60 ms fp16 on an H100)
        step rembg 120 "$PY" -m benchmarks.rembg --device "$DEV" "${REMBG_ARGS[@]}"
        # the CPU-side unit tests of the same code (interpreted kernels, sparse conv, models) on torch 2.11/py3.12
        step tests_cpu 150 "$PY" -m pytest -q -p no:cacheprovider "${CPU_TESTS[@]}" tests/test_kernels_registry.py \
            tests/test_kernels_sparse_conv.py tests/test_kernels_mesh_extract.py tests/test_kernels_attr_sample.py \
            tests/test_kernels_aot.py tests/test_sparse_conv.py tests/test_sparse_spatial.py tests/test_sparse_vae.py \
            tests/test_models_flow.py
    else
        # (e) full-size random weights (official shapes from .gpu_shared/official_state_dict), then the pipelines
        if [ "$DRY" = 0 ] && [ -f "$MODEL_DIR/pipeline.json" ]; then
            echo "reusing $MODEL_DIR" | tee -a "$LOG"
        else
            step write_fullsize 150 "$PY" -m benchmarks.fullsize "$MODEL_DIR" --device "$DEV" "${FULL_ARGS[@]}"
        fi
        step pipeline 210 "$PY" benchmarks/pipeline.py --model "$MODEL_DIR" --device "$DEV" \
            --types 512 1024_cascade --repeat "$PIPE_REPEAT"
        step pipeline_low_vram 150 "$PY" benchmarks/pipeline.py --model "$MODEL_DIR" --device "$DEV" \
            --types 1024_cascade --repeat "$PIPE_REPEAT" --low-vram
    fi
    finish "$part"
done
