#!/usr/bin/env bash
# Pack what the GPU test machine lacks (onnxruntime-gpu, diffusers) into parts small enough for the device tool,
# which carries at most 64 MiB a call together with the working tree (../shared/gpu.md):
#
#     scripts/gpu_pack.sh      -> .gpu/ort.tar.xz.part-aa ... (50 MiB parts, the last one smaller) + .gpu/diffusers-*.whl
#
# onnxruntime-gpu goes unpacked (a wheel is a zip; xz packs it ~20% smaller than the wheel's deflate, which saves a
# transfer) and without its TensorRT provider library (TensorRT cannot be installed there). The diffusers wheel
# travels with the smallest part, in the first call, so that the models can be built (scripts/gpu_build.sh) while
# the other parts travel. scripts/gpu_check.sh unpacks the parts it finds in $WHEELS.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu
ls .gpu/onnxruntime_gpu-*.whl .gpu/diffusers-*.whl >/dev/null 2>&1 || python3 -m pip download --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .gpu \
    onnxruntime-gpu==1.31.1 diffusers
rm -rf .gpu/site .gpu/ort.tar.xz*
mkdir -p .gpu/site
unzip -q .gpu/onnxruntime_gpu-*.whl -d .gpu/site
rm -f .gpu/site/onnxruntime/capi/libonnxruntime_providers_tensorrt.so
tar -C .gpu/site -cf - . | xz -9e -T0 > .gpu/ort.tar.xz
split -b 50M .gpu/ort.tar.xz .gpu/ort.tar.xz.part-
rm -rf .gpu/site .gpu/ort.tar.xz
ls -l .gpu/ort.tar.xz.part-* .gpu/diffusers-*.whl
