#!/usr/bin/env bash
# Tidal side by side with the systems its users would pick instead, on this machine, with the
# same ONNX models, the same runtime (ONNX Runtime 1.31.1), the same cores and the same load
# generator (Triton's perf_analyzer, speaking KServe V2 over gRPC to every server):
#   raw     ONNX Runtime alone in one process (scripts/peers/raw_ort.py): the limit;
#   tidal   a Tidal agent under a fixed plan: one worker, CORES cores (agent/examples/static_plan.rs);
#   triton  Triton Inference Server through nvidia-pytriton, its dynamic batcher, ONNX Runtime
#           inside the bound function (scripts/peers/triton_peer.py);
#   ray     Ray Serve, @serve.batch, autoscaling 1..CORES replicas of one core each
#           (scripts/peers/ray_peer.py).
# For each variant it prints, per system: saturation throughput with no server-side batching
# (the best of concurrency 1, 2, 4), with batches of up to 4, 8 and 16 (concurrency twice the
# batch), and p50/p99 at a fixed rate (RATE_SHARE of raw ONNX Runtime's batch-1 throughput,
# batches of up to 8). About 10 minutes per variant.
#
# With TRACE_VARIANTS set (e.g. resnet50,resnet101), it then replays the demo's slice of the
# Twitter trace (scripts/cluster.sh: seconds 26700-28500 x0.8, 6x faster, SLO 250 ms p99) with
# `tidalctl load --protocol v2`, the load generator `make demo` uses, TRACE_RUNS times, the
# systems interleaved in each round, and prints SLO violations, p99, served accuracy and cores:
#   - each peer serves each of those variants alone on all CORES cores, batches of up to 8;
#   - Tidal is a controller and an agent offering CORES cores, with the demo's five ResNets as
#     one task and the cost weight off (--beta 0): the controller spends the cores on accuracy
#     and mixes the variants as the load moves. The variants are profiled once, on the first
#     round, and every round reuses those profiles.
# About 5 minutes per replay.
#
# Knobs: VARIANTS (resnet18,resnet50), SYSTEMS (tidal,triton,ray), CORES (2), BATCHES (4,8,16),
# RATE_SHARE (0.6), REQUESTS (perf_analyzer requests per measurement window, 300),
# TRACE_VARIANTS (none), TRACE_RUNS (1 with TRACE_VARIANTS, else 0); TIDAL_AGENT_BIN runs another
# build of the agent (an A/B of two builds). Logs, replay summaries and each replay's requests
# go to .tidal/peers-results.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh # the demo's trace slice and SLO, and starting local daemons

VARIANTS=${VARIANTS-resnet18,resnet50}
TRACE_VARIANTS=${TRACE_VARIANTS:-}
SYSTEMS=${SYSTEMS:-tidal,triton,ray}
CORES=${CORES:-2}
BATCHES=${BATCHES:-4,8,16}
RATE_SHARE=${RATE_SHARE:-0.6}
REQUESTS=${REQUESTS:-300}
TRACE_RUNS=${TRACE_RUNS:-$([ -n "$TRACE_VARIANTS" ] && echo 1 || echo 0)}
# A measurement on loopback, one machine: plaintext.
export TIDAL_INSECURE_PLAINTEXT=true

scripts/client-tools.sh >/dev/null
scripts/peer-tools.sh
cargo build --release -q -p tidal-agent -p tidal-controller -p tidalctl --bins --example static_plan
$BIN/tidalctl models generate --out models --resolution "$RESOLUTION" --variants "$TASK_VARIANTS" >/dev/null
PA=.tidal/clients/bin/perf_analyzer
PY=.tidal/peers/venv/bin/python
WORK=.tidal/peers-results
rm -rf "$WORK" && mkdir -p "$WORK"
SERVER_PID=""
trap 'stop_server; stop_all' EXIT

# Each start of a peer takes fresh ports: Triton cannot bind a port that still has connections
# in TIME_WAIT from the run before.
STARTS=0
# The endpoint of each system: its gRPC address and the metadata its router needs.
url_of() {
  case $1 in
    tidal) echo 127.0.0.1:7199 ;;
    triton) echo "127.0.0.1:$((18000 + 3 * STARTS))" ;;
    ray) echo "127.0.0.1:$((19000 + 2 * STARTS))" ;;
  esac
}
headers_of() { [ "$1" = ray ] && echo "-H application:classify" || true; }

start_server() { # system variant max_batch
  local system=$1 variant=$2 batch=$3 model=$PWD/models/$2.onnx
  STARTS=$((STARTS + 1))
  local triton_port=$((18000 + 3 * STARTS)) ray_port=$((19000 + 2 * STARTS))
  case $system in
    tidal) ./target/release/examples/static_plan models "$variant" $((CORES * 1000)) "$batch" >"$WORK/server.log" 2>&1 & ;;
    triton) "$PY" scripts/peers/triton_peer.py --model "$model" --threads "$CORES" --max-batch "$batch" \
              --grpc-port "$triton_port" --http-port $((triton_port + 1)) --metrics-port $((triton_port + 2)) \
              >"$WORK/server.log" 2>&1 & ;;
    ray) "$PY" scripts/peers/ray_peer.py --model "$model" --cores "$CORES" --threads 1 --max-batch "$batch" \
              --grpc-port "$ray_port" --http-port $((ray_port + 1)) >"$WORK/server.log" 2>&1 & ;;
  esac
  SERVER_PID=$!
  local header=""; [ "$system" = ray ] && header="application"
  for _ in $(seq 1 120); do
    if "$PY" - "$(url_of "$system")" "$header" <<'EOF' 2>/dev/null; then return 0; fi
import sys, tritonclient.grpc as g
headers = {sys.argv[2]: "classify"} if sys.argv[2] else None
sys.exit(0 if g.InferenceServerClient(sys.argv[1]).is_model_ready("classify", headers=headers) else 1)
EOF
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "peers: $system did not start:"; tail -20 "$WORK/server.log"; exit 1; }
    sleep 1
  done
  echo "peers: $system is not ready after 120 s"; tail -20 "$WORK/server.log"; exit 1
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
  pkill -f tritonserver 2>/dev/null || true
  [ -x .tidal/peers/venv/bin/ray ] && .tidal/peers/venv/bin/ray stop --force >/dev/null 2>&1 || true
  # Nothing of this server may compete with the next for the cores.
  for _ in $(seq 1 60); do
    pgrep -f 'tritonserver|ray::|raylet|gcs_server|static_plan' >/dev/null || return 0
    sleep 0.5
  done
  pkill -9 -f 'tritonserver|raylet|gcs_server' 2>/dev/null || true
}

# perf_analyzer against the running server; prints the CSV row's fields we keep:
# throughput p50_ms p99_ms.
measure() { # system mode-args...
  local system=$1; shift
  # shellcheck disable=SC2046
  "$PA" -m classify -u "$(url_of "$system")" -i grpc $(headers_of "$system") \
    --measurement-mode count_windows --measurement-request-count "$REQUESTS" -s 100 --max-trials 3 \
    -f "$WORK/pa.csv" "$@" >"$WORK/pa.log" 2>&1 || { echo "0 0 0"; return; }
  "$PY" - "$WORK/pa.csv" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
best = max(rows, key=lambda r: float(r["Inferences/Second"]))
print(f'{float(best["Inferences/Second"]):.1f} {float(best["p50 latency"]) / 1000:.2f} {float(best["p99 latency"]) / 1000:.2f}')
EOF
}

echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo "versions: tidal $(git rev-parse --short HEAD), onnxruntime 1.31.1, nvidia-pytriton 0.7.0, ray $("$PY" -c 'import ray; print(ray.__version__)'), $("$PA" --version 2>&1 | head -1)"
for variant in ${VARIANTS//,/ }; do
  echo
  echo "== $variant (64x64), $CORES cores"
  raw=$("$PY" scripts/peers/raw_ort.py --model "models/$variant.onnx" --threads "$CORES" --batches "1,${BATCHES}" --seconds 5)
  echo "$raw"
  raw1=$(echo "$raw" | awk '/batch=1 /{split($3, t, "="); print t[2]}')
  rate=$("$PY" -c "print(max(1, round($raw1 * $RATE_SHARE)))")
  for system in ${SYSTEMS//,/ }; do
    start_server "$system" "$variant" 1
    if [ "$system" = triton ] && [ -z "${TRITON_SHOWN:-}" ]; then
      TRITON_SHOWN=1
      "$PY" -c "import sys, tritonclient.grpc as g; m = g.InferenceServerClient(sys.argv[1]).get_server_metadata(); print('triton: tritonserver', m.version)" "$(url_of triton)"
    fi
    read -r t p50 p99 < <(measure "$system" --concurrency-range 1:4:2)
    echo "$system batch=1 saturation=$t req/s (p50 $p50 ms, p99 $p99 ms)"
    stop_server
    for b in ${BATCHES//,/ }; do
      start_server "$system" "$variant" "$b"
      read -r t p50 p99 < <(measure "$system" --concurrency-range $((2 * b)))
      echo "$system batch<=$b saturation=$t req/s (p50 $p50 ms, p99 $p99 ms)"
      if [ "$b" = 8 ]; then
        read -r t p50 p99 < <(measure "$system" --request-rate-range "$rate")
        echo "$system fixed rate $rate req/s, batch<=8: served $t req/s, p50 $p50 ms, p99 $p99 ms"
      fi
      stop_server
    done
  done
done

# Tidal's side of the replay: a fresh controller (cost weight off) and agent on CORES cores.
TIDAL_CTL=127.0.0.1:17000
TIDAL_AGENT=127.0.0.1:17100
start_tidal_cluster() { # run
  check_ports 17000 17001 17100 17101
  start_bg "$WORK/tidal-controller-$1.log" $BIN/tidal-controller --listen "$TIDAL_CTL" --peer-listen 127.0.0.1:17001 \
    --data-dir "$WORK/tidal-controller-$1" --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S" --beta 0
  start_bg "$WORK/tidal-agent-$1.log" $BIN/tidal-agent serve --node node-1 --listen "$TIDAL_AGENT" \
    --control-listen 127.0.0.1:17101 --controller "$TIDAL_CTL" --model-dir models --cores "$CORES"
  wait_for_status "$TIDAL_CTL"
  wait_for_node "$TIDAL_CTL" node-1
  $BIN/tidalctl --controller "$TIDAL_CTL" task register --name classify --slo-ms "$SLO_MS" --model-dir models \
    --variants "$TASK_VARIANTS" >/dev/null
  if [ ! -f "$WORK/tidal-profiles.json" ]; then
    echo "(profiling $TASK_VARIANTS on the idle agent: 1 and $CORES cores, batches 1/4/8, 3 runs a point)"
    $BIN/tidalctl --controller "$TIDAL_CTL" profile --agent 127.0.0.1:17101 --task classify --cores "1,$CORES" \
      --batches 1,4,8 --duration-ms 1000 --repeat 3 --save "$WORK/tidal-profiles.json" >/dev/null
  else
    $BIN/tidalctl --controller "$TIDAL_CTL" profile --task classify --from "$WORK/tidal-profiles.json" >/dev/null
  fi
  wait_for_plan "$TIDAL_CTL"
}

# replay NAME ARGS…: the demo's slice through `tidalctl load --protocol v2 ARGS…`.
replay() {
  local name=$1
  shift
  $BIN/tidalctl load --protocol v2 --task classify --trace "$TRACE" --start "$START" --duration "$DURATION" \
    --scale "$SCALE" --speedup "$SPEEDUP" --summary-json "$WORK/replay-$name.json" --out "$WORK/requests-$name.csv" \
    "$@" 2>&1 | grep -v -e '^load: ' -e 'plaintext gRPC with no authentication'
}

for run in $(seq 1 "$TRACE_RUNS"); do
  for system in ${SYSTEMS//,/ }; do
    if [ "$system" = tidal ]; then
      echo
      echo "== trace replay $run: tidal adapting over $TASK_VARIANTS on $CORES cores (--beta 0)"
      start_tidal_cluster "$run"
      replay "tidal-$run" --controller "$TIDAL_CTL" --agent "$TIDAL_AGENT"
      stop_all
      continue
    fi
    for variant in ${TRACE_VARIANTS//,/ }; do
      accuracy=$(awk -F' *= *' '/^accuracy/ {print $2}' "models/$variant.toml")
      echo
      echo "== trace replay $run: $system serving $variant ($accuracy %) on $CORES cores, batches of up to 8"
      start_server "$system" "$variant" 8
      header=(); [ "$system" = ray ] && header=(--header application=classify)
      replay "$system-$variant-$run" --agent "$(url_of "$system")" "${header[@]}" --slo-ms "$SLO_MS" \
        --input-shape "3,$RESOLUTION,$RESOLUTION" --accuracy "$accuracy"
      stop_server
    done
  done
done
