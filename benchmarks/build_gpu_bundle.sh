#!/usr/bin/env bash
# Build .whl/ (git-ignored, in .gitignore; carry it to the device) for benchmarks/gpu_check.sh: our three wheels, the
# dependencies the GPU machine lacks (pure Python, or cp312 manylinux x86-64 binaries: ISA-L too, without
# which OME-TIFF tiles are deflated by zlib, ~6x slower), and two prebuilt
# ONNX packages (the GPU machine has no TensorFlow to export them). Run here, right before carrying .whl/,
# so the wheels hold the current tree:  bash benchmarks/build_gpu_bundle.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=.venv/bin/pip
rm -rf .whl && mkdir .whl
$PIP wheel -q --no-deps -w .whl . plugins/czregistry-onnx plugins/czregistry-torch 2>&1 | grep -v '^WARNING: Location' || true
$PIP download -q --no-deps -d .whl onnx2torch==1.5.15 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 attrs==26.1.0 platformdirs==4.14.8 alembic==1.20.1 mako==1.4.3 zarr==3.1.6 \
    donfig==0.8.1.post1 cztile==2.0.0 typing-extensions==4.16.0 2>&1 | grep -v '^WARNING: Location' || true
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl rpds-py==2026.9.1 \
    sqlalchemy==2.1.9 numcodecs==0.17.1 crc32c==2.9.post0 google-crc32c==1.9.0 pyyaml==6.0.4 \
    markupsafe==3.0.4 isal==1.9.1 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python benchmarks/build_gpu_packages.py .whl 2>&1 | grep czann
ls .whl
du -sh .whl
