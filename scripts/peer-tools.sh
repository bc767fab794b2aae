#!/usr/bin/env bash
# Installs the peers Tidal is measured against (scripts/peers.sh) into a virtual environment,
# .tidal/peers/venv: nvidia-pytriton 0.7.0 (Triton Inference Server with its Python backend),
# ray[serve], onnxruntime 1.31.1 (the runtime Tidal's workers load), numpy, grpcio-tools.
#
# The venv is made from the system's Python (/usr/bin/python3): pytriton's Python-backend stub
# embeds the system's libpython3.X and runs the venv's standard library and packages with it,
# so the two must be the same Python. About 800 MB. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.tidal/peers/venv
SYSTEM_PY=${SYSTEM_PY:-/usr/bin/python3}
if [ -x "$VENV/bin/python" ] && [ -e "$VENV/.done" ]; then
  echo "peer-tools: peers installed in $VENV"
  exit 0
fi
[ -x "$SYSTEM_PY" ] || { echo "peer-tools: $SYSTEM_PY is needed (Debian's python3, with venv)" >&2; exit 1; }
version=$("$SYSTEM_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if ! ldconfig -p | grep -q "libpython$version.so.1.0"; then
  echo "peer-tools: libpython$version.so.1.0 is missing (Debian: apt-get install libpython$version)" >&2
  exit 1
fi
echo "peer-tools: installing nvidia-pytriton, ray[serve] and onnxruntime into $VENV (Python $version)"
rm -rf "$VENV"
"$SYSTEM_PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
  "nvidia-pytriton==0.7.0" "ray[serve]" "onnxruntime==1.31.1" "numpy<2" "protobuf>=3.20,<5" "grpcio-tools"
touch "$VENV/.done"
echo "peer-tools: peers installed in $VENV"
