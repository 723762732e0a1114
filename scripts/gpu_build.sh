#!/usr/bin/env bash
# Build the benchmark presets on the GPU test machine (CPU work: random-weight checkpoints, ONNX exports), in the
# background while the rest of the check runs: SD 1.5 for both targets first, SDXL (cuda target) beside them.
#
#     SITE=/tmp/site-build setsid scripts/gpu_build.sh &      (from the repository root)
#
# SITE holds diffusers only: the exports use the machine's own onnxruntime, never a half-unpacked onnxruntime-gpu.
# Logs and a `<name>.done` file (holding the exit status) per build land in $BUILD_LOGS (default /tmp/diffrt-build).
set -uo pipefail
cd "$(dirname "$0")/.."
# Run from a copy: the device tool refreshes the working tree at every call, and these builds outlast a call.
SOURCE=/tmp/diffrt-build-source
rm -rf "$SOURCE" && mkdir -p "$SOURCE" && cp -r diffrt pyproject.toml "$SOURCE"/ && cd "$SOURCE"
export PYTHONPATH=${SITE:-/tmp/site-build}:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export DIFFRT_CACHE=${DIFFRT_CACHE:-/tmp/diffrt-cache}
LOGS=${BUILD_LOGS:-/tmp/diffrt-build}
mkdir -p "$LOGS"
build() {  # build NAME ARGS...: one preset build, its log and its exit status
    local name=$1; shift
    python3 -m diffrt.bench.preset_build "$@" > "$LOGS/$name.log" 2>&1
    echo $? > "$LOGS/$name.done"
}
build sd15-checkpoint sd15 --checkpoint-only
build sd15-cuda sd15 --precision fp16 --target cuda &
build sd15-onnxruntime sd15 --precision fp16 --target onnxruntime &
build sdxl-cuda sdxl --precision fp16 --target cuda &
wait
echo finished > "$LOGS/all.done"
