#!/usr/bin/env bash
# Build, GPU tests and benchmarks on a GPU machine, in one command (for machines reached one command at a time):
#   STAGES="build test decode" DECODE_ARGS="--contexts 128K --batches 8" bash bench/gpu_session.sh
# Stages (STAGES, default "build test decode"):
#   build    pip install -e . with the CUDA kernels for TORCH_CUDA_ARCH_LIST (default 9.0), ~65 s on 16 cores
#   test     the GPU test files (TESTS= picks others, TEST_S= time limit)
#   profile  bench/profile_decode.py: per-kernel times of one decode step (PROFILE_POINTS="context batch mode,...")
#   decode   kvstore bench decode (DECODE_ARGS=, DECODE_S=)
#   e2e      kvstore bench e2e (E2E_ARGS=, E2E_S=)
#   recall   the 1M-key generated recall benchmark (needs faiss: a wheel in .whl/ is installed first)
# Text logs all go to one file, $OUT/session.txt (OUT defaults to /tmp/kvstore_out); benchmark results beside it.
set -uo pipefail
OUT=${OUT:-/tmp/kvstore_out}
STAGES=${STAGES:-"build test decode"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
# One log file: some remote runners return only a few files.
LOG="$OUT/session.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
if has build; then
    t0=$(date +%s)
    export MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
    python3 -m pip install -v --no-build-isolation --no-deps -e . > /tmp/build.log 2>&1 \
        || { cp /tmp/build.log "$OUT/"; grep -n -i -B2 -A8 "error" /tmp/build.log | head -80; exit 1; }
    echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
fi
python3 -m kvstore.cli info 2>&1 | tee -a "$LOG"
if has test; then
    timeout ${TEST_S:-240} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_gpu_attention_ops.py \
        tests/test_gpu_cluster_ops.py tests/test_gpu_kmeans.py tests/test_gpu_wave_layer.py tests/test_graph_split.py \
        tests/test_gpu_estimation.py tests/test_store.py} \
        2>&1 | tail -40 | tee -a "$LOG"
fi
if has profile; then
    # whole tables into files of their own (the per-kernel table is long), the stage timings into the log
    IFS=, read -ra points <<< "${PROFILE_POINTS:-131072 8 gpu_only,1048576 1 gpu_only,131072 8 offload}"
    for pt in "${points[@]}"; do
        set -- $pt
        f="$OUT/profile_$1_b$2_$3.txt"
        timeout 90 python3 bench/profile_decode.py --context $1 --batch $2 --mode $3 --parts 2>&1 | grep -v Warn > "$f"
        echo "profile $pt: $f" | tee -a "$LOG"
        grep -E "^(cluster scores|zones|candidate scores|exact tokens|values|mean values|steady|merge|whole step)" "$f" \
            | tee -a "$LOG"
    done
fi
if has decode; then
    timeout ${DECODE_S:-420} python3 -m kvstore.cli bench decode --out "$OUT" ${DECODE_ARGS:-} 2>&1 \
        | grep -v "^decode:" | tee -a "$LOG" | tail -60
fi
if has e2e; then
    timeout ${E2E_S:-300} python3 -m kvstore.cli bench e2e --out "$OUT" ${E2E_ARGS:-} 2>&1 | grep -v "it/s\|s/it" | tee -a "$LOG" | tail -30
fi
if has recall; then
    timeout ${RECALL_S:-480} python3 -m kvstore.benchmarks.recall --data generated --n-keys 1000000 \
        --n-train 200000 --max-test 200 --out "$OUT" --no-progress 2>&1 | tee -a "$LOG"
fi
