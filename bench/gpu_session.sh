#!/usr/bin/env bash
# One call on the GPU machine (device tool): build, run the GPU tests, run the benchmarks.
#   device run: STAGES="build test decode" bash bench/gpu_session.sh
# Stages: build (pip install -e . for sm_90, ~65 s; the built kvstore._cuda is too large for the device tool to
# bring back, so every call builds), test (GPU tests, TESTS= to pick), profile (bench/profile_decode.py),
# decode (kvstore bench decode, DECODE_ARGS=), e2e (kvstore bench e2e, E2E_ARGS=), recall (1M generated recall,
# needs a carried faiss wheel in .whl/). Logs go to $OUT/session.txt, benchmark results beside it.
set -uo pipefail
OUT=${OUT:-/tmp/kvstore_out}
STAGES=${STAGES:-"build test decode"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
# The device tool brings back only a few files: every text log goes to one file, session.txt.
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
    timeout 90 python3 bench/profile_decode.py --context 131072 --batch 8 --parts 2>&1 | grep -v Warn \
        | tail -32 | tee -a "$LOG"
    timeout 90 python3 bench/profile_decode.py --context 1048576 --batch 1 --parts 2>&1 | grep -v Warn \
        | tail -32 | tee -a "$LOG"
    timeout 90 python3 bench/profile_decode.py --context 131072 --batch 8 --mode offload 2>&1 | grep -v Warn \
        | tail -26 >> "$LOG"
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
