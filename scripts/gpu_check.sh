#!/usr/bin/env bash
# The one prepared check for the GPU test machine (../shared/gpu.md, issue #17), run from the repository root:
#
#     WHEELS=/tmp/w OUT=/tmp/out scripts/gpu_check.sh
#
# WHEELS holds what the machine lacks: the parts `ort.tar.xz.part-*` of onnxruntime-gpu and the diffusers wheel
# (scripts/gpu_pack.sh makes both). Everything else is the machine's own Python (torch with CUDA, transformers,
# onnx, ...). Models are built here from the presets' published configs with random weights, never copied: by
# scripts/gpu_build.sh, started earlier in the background if the parts came in several calls, else started here.
# Results under OUT (at most 8 files come back from the device tool):
#   summary.txt  one line per stage: name, exit status, seconds since start
#   log.txt      every stage's output;  build.txt  the end of each preset build's log
#   rng.json     diffrt.rng's CUDA Philox vs torch.randn on this GPU
#   probe.json   scripts/gpu_probe.py: CUDA-vs-CPU parity per component and per image, VAE decode sweep, profiles
#   sd15-cuda.json, sd15-ort.json, sdxl.json   diffrt bench records (schema diffrt-bench/1)
# The correctness checks run while the exports build; the benchmarks run once the CPU is quiet, the most important
# figure (SD 1.5, side by side with Diffusers) first. Each stage has its own time limit inside BUDGET seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
WHEELS=${WHEELS:-/tmp/w}
BUDGET=${BUDGET:-570}
BUILD_LOGS=/tmp/diffrt-build
mkdir -p "$OUT"
START=$(date +%s)
LOG=$OUT/log.txt

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$LOG"; }
# stage NAME LIMIT COMMAND...: run with a time limit (cut to the budget left), output to log.txt, a summary line
stage() {
    local name=$1 limit=$2; shift 2
    if (( $(left) < 30 )); then say "== $name skipped: $(left)s left"; echo "$name skipped $(elapsed)" >> "$OUT/summary.txt"; return 1; fi
    (( limit > $(left) )) && limit=$(left)
    say "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local rc=$?
    say "== $name rc=$rc"
    echo "$name $rc $(elapsed)" >> "$OUT/summary.txt"
    return $rc
}
collect_build_logs() {
    for log in "$BUILD_LOGS"/*.log; do
        [[ -f $log ]] || continue
        echo "== $(basename "$log") (exit: $(cat "${log%.log}.done" 2>/dev/null || echo running))"
        grep -v "it/s\]" "$log" | tail -n 25
    done > "$OUT/build.txt"
}
# wait_for NAME MAX_SECONDS: until preset build NAME is done (0 if it succeeded)
wait_for() {
    local name=$1 deadline=$(( $(elapsed) + $2 ))
    while [[ ! -f $BUILD_LOGS/$name.done ]] && (( $(elapsed) < deadline )); do sleep 5; done
    [[ -f $BUILD_LOGS/$name.done && $(cat "$BUILD_LOGS/$name.done") == 0 ]]
}

# ----- 1. install what the machine lacks, beside its own packages -----
SITE=/tmp/site
mkdir -p "$SITE" /tmp/site-build
if ls "$WHEELS"/ort.tar.xz.part-* >/dev/null 2>&1 && [[ ! -d $SITE/onnxruntime ]]; then
    cat "$WHEELS"/ort.tar.xz.part-* | xz -d -T0 | tar -x -C "$SITE"
fi
for target in "$SITE" /tmp/site-build; do
    [[ -d $target/diffusers ]] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" \
        "$WHEELS"/diffusers-*.whl >> "$LOG" 2>&1
done
export PYTHONPATH=$SITE:$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false DIFFRT_CACHE=/tmp/diffrt-cache
# ONNX Runtime's CUDA provider loads CUDA/cuDNN from the nvidia-* packages: their lib folders go on the path too
# (diffrt also calls onnxruntime.preload_dlls()).
NVIDIA=$(python3 -c "import nvidia; print(list(nvidia.__path__)[0])" 2>/dev/null)
if [[ -n "$NVIDIA" ]]; then
    export LD_LIBRARY_PATH=$(find "$NVIDIA" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
fi
if [[ ! -d $BUILD_LOGS ]]; then
    say "starting the preset builds (scripts/gpu_build.sh)"
    SITE=/tmp/site-build setsid bash scripts/gpu_build.sh > /dev/null 2>&1 < /dev/null &
fi
say "installed; $(python3 -V 2>&1)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >> "$LOG" 2>&1
python3 - >> "$LOG" 2>&1 <<'EOF'
import onnxruntime as ort, torch, diffusers, transformers
from diffrt.bench.report import machine_info
from diffrt.runtime.engines.onnxruntime_cuda import cuda_device_count, cuda_usable
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
print("torch", torch.__version__, torch.cuda.get_device_name(0), "diffusers", diffusers.__version__,
      "transformers", transformers.__version__)
print("cuda devices", cuda_device_count(), "cuda usable", cuda_usable())
info = machine_info()
print("cpu", info["cpu"], info["cpu_flags"], "cpus", info["usable_cpus"], "load", info["load_average"])
EOF

# ----- 2. correctness while the exports build -----
stage rng 90 python3 scripts/gpu_rng_check.py --json "$OUT/rng.json"
stage tiny 150 python3 scripts/benchmark.py tiny --provider cuda,cuda:graph --compare diffusers --steps 8 \
    --warmup 1 --runs 2 --json /tmp/tiny.json
stage pytest 240 python3 -m pytest -m gpu -q -rfEs -p no:cacheprovider tests/test_onnxruntime_cuda_gpu.py \
    tests/test_rng.py tests/test_runtime_engines.py tests/test_export_models.py tests/test_tensorrt_gpu.py

# ----- 3. the benchmarks, once the SD 1.5 builds are done (host times suffer from a busy CPU) -----
say "waiting for the SD 1.5 packages"
wait_for sd15-cuda $(( $(left) - 300 )); wait_for sd15-onnxruntime $(( $(left) - 300 ))
collect_build_logs
if wait_for sd15-cuda 0 && wait_for sd15-onnxruntime 0; then
    stage probe 150 python3 scripts/gpu_probe.py --preset sd15 --json "$OUT/probe.json"
fi
SD15=(sd15 --steps 50 --warmup 1 --runs 3 --compare diffusers)
if wait_for sd15-cuda 0; then
    stage sd15-cuda 160 python3 scripts/benchmark.py "${SD15[@]}" --target cuda --provider cuda:graph,cuda \
        --json "$OUT/sd15-cuda.json"
else say "no sd15 cuda-target package: see build.txt"; fi
if wait_for sd15-onnxruntime 0; then
    stage sd15-ort 180 python3 scripts/benchmark.py "${SD15[@]}" --target onnxruntime \
        --provider cuda:graph,cuda,cuda:nhwc --json "$OUT/sd15-ort.json"
else say "no sd15 onnxruntime-target package: see build.txt"; fi
if wait_for sdxl-cuda $(( $(left) - 170 )); then
    stage sdxl 170 python3 scripts/benchmark.py sdxl --steps 30 --warmup 1 --runs 2 --compare diffusers \
        --target cuda --provider cuda:graph --json "$OUT/sdxl.json"
else say "no sdxl package in time: see build.txt"; fi
collect_build_logs
nvidia-smi >> "$LOG" 2>&1
say "done"
