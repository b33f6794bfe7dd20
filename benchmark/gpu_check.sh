#!/usr/bin/env bash
# The GPU check, in at most GPU_CHECK_BUDGET seconds (default 540: 8 minutes for steps 1-3, 150 s for the twin; the
# device tool's limit per call is 600 s), every step under `timeout`:
#   1. nvidia-smi and torch.cuda's view of the device;
#   2. the CUDA-only and compile tests: pytest -q -m "not slow" -k "cuda or compile" tests/ (none selected is no error);
#   3. benchmark/speed.py for the five algorithms, eager / --compile / --cudagraphs, at myoLegWalk-v0 sizes
#      (E = 80 envs, --env-workers = min(cores, 16)), its table written to RESULTS/speed.md after every row;
#   4. MyoSuite's GPU twin (--env-backend mjlab): env-only steps/s at E = 80, 1024, 4096 worlds and SAC / Qflex SPS on
#      it at the largest E, in the last GPU_CHECK_TWIN_S seconds (default 150), table in RESULTS/twin.md. It needs the twin's
#      environment (.venv-mjlab, requirements-mjlab.txt); where it is missing the check tries to make it (pip, 120 s
#      at most: it needs the package index) and otherwise records the step as skipped.
# A failing or hanging step is recorded and the next one runs; a summary (also RESULTS/summary.txt) ends the output.
#
#   bash benchmark/gpu_check.sh                  # on the GPU machine, from anywhere
#   GPU_CHECK_DRY=1 bash benchmark/gpu_check.sh  # print the commands it would run, run nothing
#
# Settings (environment): PYTHON (python3), GPU_CHECK_BUDGET (540 s), GPU_CHECK_RESULTS (results directory; default
# $OUT/gpu_check where $OUT is set, else /tmp/gpu_check.<date>), GPU_CHECK_ALGOS (sac qflex dacer
# crossq sdac: the order is the priority when the budget runs out), GPU_CHECK_NUM_ENVS (80), GPU_CHECK_PYTEST_S (120),
# GPU_CHECK_TWIN_S (150; 0 skips the twin).
# Python packages missing there (gymnasium, mujoco, myosuite, tyro, ...) are installed from ./.whl if it exists.
set -u
cd "$(dirname "$0")/.." || exit 1

PYTHON=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-540}
DRY=${GPU_CHECK_DRY:-0}
if [[ -n ${GPU_CHECK_RESULTS:-} ]]; then
    RESULTS=$GPU_CHECK_RESULTS
elif [[ -n ${OUT:-} ]]; then
    RESULTS=$OUT/gpu_check # 8 files at most, for a machine that brings back only a few files from $OUT
else
    RESULTS=/tmp/gpu_check.$(date +%Y%m%d-%H%M%S)
fi
read -r -a ALGOS <<<"${GPU_CHECK_ALGOS:-sac qflex dacer crossq sdac}"
NUM_ENVS=${GPU_CHECK_NUM_ENVS:-80}
PYTEST_S=${GPU_CHECK_PYTEST_S:-120}
CORES=$(nproc 2>/dev/null || echo 1)
WORKERS=$((CORES < 16 ? CORES : 16))
((WORKERS > NUM_ENVS)) && WORKERS=$NUM_ENVS
TWIN_S=${GPU_CHECK_TWIN_S:-150}
TWIN_PYTHON=$PWD/.venv-mjlab/bin/python
SPEED_RESERVE=$((240 + TWIN_S)) # seconds kept for the speed table (and the twin) while the earlier steps run
START=$SECONDS
SUMMARY=()
DRY_SPENT=0 # a dry run counts every step as taking its whole timeout, so it prints the worst case

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
export MUJOCO_GL=${MUJOCO_GL:-egl}

left() { echo $((BUDGET - (SECONDS - START) - DRY_SPENT)); }

# step NAME MAX_S RESERVE_S CMD...: run CMD for at most min(MAX_S, seconds left - RESERVE_S), the kill included
# (`timeout -k 5` at 5 s less), output to the terminal and RESULTS/NAME.log; record how it ended.
step() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local limit=$(($(left) - reserve))
    ((limit > max)) && limit=$max
    if ((limit < 10)); then
        echo "== $name: skipped, the budget is spent"
        SUMMARY+=("$name: skipped (budget spent)")
        return 0
    fi
    echo "== $name (at most ${limit} s; $(left) s of the budget left)"
    local arg
    printf '   $'
    for arg in "$@"; do
        if ((${#arg} > 100)); then printf ' <%d-character script>' "${#arg}"; else printf ' %q' "$arg"; fi
    done
    echo
    if [[ $DRY == 1 ]]; then
        SUMMARY+=("$name: dry run (at most ${limit} s)")
        DRY_SPENT=$((DRY_SPENT + limit))
        return 0
    fi
    local begin=$SECONDS rc
    timeout -k 5 $((limit - 5)) "$@" 2>&1 | tee "$RESULTS/$name.log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - begin)) how
    case $rc in
    0) how="ok" ;;
    124 | 137) how="TIMED OUT after $((limit - 5)) s" ;;
    *) how="FAILED (exit $rc): $(grep -v '^\s*$' "$RESULTS/$name.log" | tail -n 1 | cut -c1-200)" ;;
    esac
    [[ $name == pytest && $rc == 5 ]] && how="ok: no test selected"
    SUMMARY+=("$name: $how, ${took} s")
    return 0
}

echo "gpu_check: budget ${BUDGET} s, results in $RESULTS, $CORES cores, E = $NUM_ENVS, env workers $WORKERS"
[[ $DRY == 1 ]] && echo "gpu_check: dry run (GPU_CHECK_DRY=1): printing the commands only"
[[ $DRY == 1 ]] || mkdir -p "$RESULTS" || exit 1

# 0. Packages a bare GPU image lacks, from wheels put in ./.whl beforehand (`pip download` on a machine with network).
if [[ -d .whl ]] && ! $PYTHON -c "import gymnasium, mujoco, myosuite, tyro, tensorboard" 2>/dev/null; then
    step deps 120 $((SPEED_RESERVE + 60)) $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

# 1. The device.
step nvidia-smi 20 $((SPEED_RESERVE + 60)) nvidia-smi
step torch-cuda 60 $((SPEED_RESERVE + 30)) $PYTHON -c '
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuDNN", torch.backends.cudnn.version(), "| available", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
'

# 2. The CUDA-only and compile tests.
step pytest "$PYTEST_S" "$SPEED_RESERVE" $PYTHON -m pytest -q -n 4 -m "not slow" -k "cuda or compile" tests/

# 3. The speed table. speed.py starts no measurement past its --deadline and stops a running one there (kill and
# reading its log take < 25 s), so it ends before its timeout and prints the whole table; sac and qflex come first.
LOGS=/tmp/gpu_check_logs.$$
SPEED_S=$(($(left) - 5 - TWIN_S))
step speed "$SPEED_S" 5 $PYTHON benchmark/speed.py --algos "${ALGOS[@]}" --variants eager compile cudagraphs \
    --sps-variants eager no-overlap --num-envs "$NUM_ENVS" --env-workers "$WORKERS" --env-seconds 2 --sps-updates 150 --updates 400 \
    --updates-per-step 8 --points 8 --timeout 90 --deadline $((SPEED_S - 45)) --out "$RESULTS/speed.md" --logs-dir "$LOGS"
if [[ $DRY != 1 ]]; then
    tar -czf "$RESULTS/speed_logs.tar.gz" -C "$LOGS" . 2>/dev/null && rm -rf "$LOGS"
fi

# 4. The GPU twin, in its own environment.
if ((TWIN_S > 0)); then
    if [[ ! -x $TWIN_PYTHON ]] && [[ $DRY != 1 ]]; then
        step twin-install 120 30 bash -c "$PYTHON -m venv --system-site-packages .venv-mjlab && \
            .venv-mjlab/bin/pip install -q -r requirements-mjlab.txt || { rm -rf .venv-mjlab; exit 1; }"
    fi
    if [[ $DRY == 1 ]] || "$TWIN_PYTHON" -c "import mjlab, mujoco_warp" 2>/dev/null; then
        TWIN_LIMIT=$(($(left) - 5))
        step twin "$TWIN_LIMIT" 5 $PYTHON benchmark/speed.py --algos sac qflex --sections twin twin-sps --twin-envs 80 1024 4096 \
            --twin-python "$TWIN_PYTHON" --env-seconds 3 --sps-updates 40 --points 6 --timeout 60 \
            --deadline $((TWIN_LIMIT - 20)) --out "$RESULTS/twin.md"
    else
        SUMMARY+=("twin: skipped, no twin environment here (.venv-mjlab: requirements-mjlab.txt needs the package index)")
    fi
fi

# Summary.
{
    echo
    echo "== gpu_check summary ($((SECONDS - START)) s of ${BUDGET} s; results in $RESULTS)"
    for line in "${SUMMARY[@]}"; do echo "  $line"; done
    for table in speed twin; do
        if [[ -f $RESULTS/$table.md ]]; then
            echo
            cat "$RESULTS/$table.md"
        fi
    done
} | if [[ $DRY == 1 ]]; then cat; else tee "$RESULTS/summary.txt"; fi
exit 0
