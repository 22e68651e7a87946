#!/usr/bin/env bash
# One call on the GPU machine (device tool): install carried wheels, build the
# extension, check the CUDA label path against the CPU, then run the large
# generated recall benchmark. Results go to $OUT.
#   device run: bash bench/gpu_session.sh   (carry: .whl)
set -uo pipefail
OUT=${OUT:-/tmp/kvstore_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -m kvstore.cli info | tee "$OUT/info.txt"
python3 -m pytest -q tests/test_graph.py tests/test_flat_faiss.py 2>&1 | tail -3 | tee "$OUT/tests.txt"
N=${KVSTORE_GPU_NKEYS:-1000000}
timeout ${KVSTORE_GPU_BENCH_S:-480} python3 -m kvstore.benchmarks.recall --data generated --n-keys "$N" \
    --n-train 200000 --max-test 200 --out "$OUT" --no-progress 2>&1 | tee "$OUT/generated.log"
