#!/usr/bin/env bash
# Installs, into .tidal/clients, the outside clients that some tests and benchmarks drive an
# agent with over the standard inference protocol (KServe V2):
#   - tritonclient 2.41.0 with its gRPC and HTTP extras and numpy (PyPI), in .tidal/clients/py;
#   - the KServe Python SDK 0.21.0 (its REST and gRPC inference clients; httpx, requests and
#     grpcio come with it), h2, and gRPC's health and reflection clients, in .tidal/clients/kserve
#     (apart: it needs a newer protobuf than tritonclient takes; about 450 MB, 35 s);
#   - Triton's perf_analyzer, which ships inside the same wheel, as .tidal/clients/bin/perf_analyzer
#     (a wrapper that puts its libraries on LD_LIBRARY_PATH): libcudart.so.12 from the
#     nvidia-cuda-runtime-cu12 wheel and libb64.so.0d from Debian's libb64-0d, unpacked here
#     rather than installed.
# Idempotent. On failure it says so and exits non-zero; the tests that need these then report
# themselves as not run.
set -euo pipefail
cd "$(dirname "$0")/.."

TRITONCLIENT=2.41.0
KSERVE=0.21.0
DIR=.tidal/clients
PY=$(command -v python3 || true)
[ -n "$PY" ] || { echo "client-tools: python3 is needed" >&2; exit 1; }

if [ ! -e "$DIR/py/.done-grpc-http" ]; then
  echo "client-tools: installing tritonclient[grpc,http]==$TRITONCLIENT, numpy and protobuf into $DIR/py"
  rm -rf "$DIR/py"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$DIR/py" \
    "tritonclient[grpc,http]==$TRITONCLIENT" "numpy<2" "protobuf>=3.20,<5"
  touch "$DIR/py/.done-grpc-http"
fi

if [ ! -e "$DIR/kserve/.done-kserve" ]; then
  echo "client-tools: installing kserve==$KSERVE, h2, grpcio-health-checking and grpcio-reflection into $DIR/kserve"
  rm -rf "$DIR/kserve"
  "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$DIR/kserve" \
    "kserve==$KSERVE" "numpy<2" "h2==4.4.1" "grpcio-health-checking==1.81.1" "grpcio-reflection==1.81.1"
  touch "$DIR/kserve/.done-kserve"
fi

if [ ! -x "$DIR/bin/perf_analyzer" ]; then
  echo "client-tools: unpacking perf_analyzer and the libraries it links into $DIR"
  rm -rf "$DIR/wheels" "$DIR/lib" "$DIR/deb" && mkdir -p "$DIR/wheels" "$DIR/lib" "$DIR/bin" "$DIR/deb"
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps -d "$DIR/wheels" \
    "tritonclient==$TRITONCLIENT" "nvidia-cuda-runtime-cu12==12.*"
  "$PY" - "$DIR" <<'EOF'
import glob, os, sys, zipfile
d = sys.argv[1]
def extract(wheel_glob, suffix, dest):
    wheel = glob.glob(os.path.join(d, "wheels", wheel_glob))[0]
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(suffix))
        with z.open(name) as src, open(dest, "wb") as out:
            out.write(src.read())
    os.chmod(dest, 0o755)
extract("tritonclient-*.whl", "data/bin/perf_analyzer", os.path.join(d, "lib", "perf_analyzer"))
extract("nvidia_cuda_runtime_cu12-*.whl", "lib/libcudart.so.12", os.path.join(d, "lib", "libcudart.so.12"))
EOF
  (cd "$DIR/deb" && { apt-get download -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get download -q libb64-0d >/dev/null; }; })
  dpkg-deb -x "$DIR"/deb/libb64-0d_*.deb "$DIR/deb/root"
  cp -L "$DIR"/deb/root/usr/lib/x86_64-linux-gnu/libb64.so.0d "$DIR/lib/"
  cat > "$DIR/bin/perf_analyzer" <<'EOF'
#!/bin/sh
# Triton's perf_analyzer (from the tritonclient wheel) with the libraries it links.
lib="$(cd "$(dirname "$0")/../lib" && pwd)"
LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$lib/perf_analyzer" "$@"
EOF
  chmod +x "$DIR/bin/perf_analyzer"
  rm -rf "$DIR/wheels" "$DIR/deb"
fi
"$DIR/bin/perf_analyzer" --version >/dev/null 2>&1 || { echo "client-tools: perf_analyzer does not start" >&2; exit 1; }
echo "client-tools: tritonclient in $DIR/py, kserve in $DIR/kserve, perf_analyzer at $DIR/bin/perf_analyzer"
