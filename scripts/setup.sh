#!/usr/bin/env bash
# Installs what a fresh machine lacks to build and run Tidal, into the project's .tidal/ folder:
# the ONNX Runtime shared library (from the pinned onnxruntime PyPI wheel; `ort` loads it at
# run time, nothing is downloaded at build time). Idempotent: does nothing when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.31.1
LIB=.tidal/lib/libonnxruntime.so

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is missing; install a Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi

if [ ! -e "$LIB" ]; then
  PY=$(command -v python3 || true)
  if [ -z "$PY" ]; then
    echo "setup: python3 with pip is needed to fetch the onnxruntime==$ORT_VERSION wheel" >&2
    exit 1
  fi
  echo "setup: installing ONNX Runtime $ORT_VERSION into .tidal/ (from the PyPI wheel)"
  rm -rf .tidal/ort-py
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target .tidal/ort-py "onnxruntime==$ORT_VERSION"
  so=$(find .tidal/ort-py/onnxruntime/capi -name "libonnxruntime.so.$ORT_VERSION" | head -n 1)
  if [ -z "$so" ]; then
    echo "setup: the onnxruntime wheel has no libonnxruntime.so.$ORT_VERSION" >&2
    exit 1
  fi
  mkdir -p .tidal/lib
  ln -sf "../ort-py/onnxruntime/capi/$(basename "$so")" "$LIB"
fi
echo "setup: ONNX Runtime at $LIB"
