# Shared by scripts/demo.sh and scripts/live-vs-sim.sh: the demo's settings, starting and
# stopping local daemons, waiting for them. Sourced, not run.
#
# Settings (environment): DEMO_TRACE (default the committed Twitter trace), DEMO_SCALE (rate
# factor), DEMO_SPEEDUP (trace seconds per wall second), DEMO_START / DEMO_DURATION (trace
# slice, in trace seconds), DEMO_SLO_MS, DEMO_INTERVAL_S (adaptation interval, wall seconds),
# DEMO_WINDOW_S (seconds of history the forecaster sees), DEMO_RESOLUTION (model input pixels),
# TIDAL_BIN_DIR (where the built binaries are; default ./target/release).
#
# The defaults replay 30 minutes of day 1 (07:25–07:55) at ×0.8: a baseline of about 65 req/s
# with a burst to 225 req/s (peaks of 250) that lasts six minutes, within what two cores carry
# with batching. 6× faster, adapting every 5 s: one interval covers 30 s of trace, as the
# papers' 30 s intervals on real time do.

BIN=${TIDAL_BIN_DIR:-./target/release}
export TIDAL_ORT_LIB=${TIDAL_ORT_LIB:-$PWD/.tidal/lib/libonnxruntime.so}
TRACE=${DEMO_TRACE:-data/twitter-trace-rps.txt.gz}
SCALE=${DEMO_SCALE:-0.8}
SPEEDUP=${DEMO_SPEEDUP:-6}
START=${DEMO_START:-26700}
DURATION=${DEMO_DURATION:-1800}
SLO_MS=${DEMO_SLO_MS:-250}
INTERVAL_S=${DEMO_INTERVAL_S:-5}
WINDOW_S=${DEMO_WINDOW_S:-20}
RESOLUTION=${DEMO_RESOLUTION:-64}
TASK_VARIANTS=resnet18,resnet34,resnet50,resnet101,resnet152

pids=()

# make_certs DIR ROLE…: a fresh CA in DIR/ca and a certificate per role (e.g. controller/1,
# agent/node-1, admin/demo) in DIR; exports TIDAL_TLS_CA (the caller picks tidalctl's identity).
make_certs() {
  local dir=$1
  shift
  rm -rf "$dir"
  $BIN/tidalctl certs init --dir "$dir/ca" --cluster demo >/dev/null
  for role in "$@"; do
    $BIN/tidalctl certs issue --ca-dir "$dir/ca" --role "$role" --out "$dir" --days 30 >/dev/null
  done
  export TIDAL_TLS_CA=$dir/ca/ca.pem
}

# tls_flags DIR ROLE: the flags a daemon needs to speak as ROLE.
tls_flags() {
  local stem=${2//\//-}
  echo "--tls-cert $1/$stem.pem --tls-key $1/$stem.key"
}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

check_trace() {
  if [ ! -f "$TRACE" ]; then
    echo "the trace $TRACE is missing (set DEMO_TRACE to a file of one integer per line)" >&2
    exit 1
  fi
}

check_ports() {
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is in use; stop what listens there (another demo?) and retry" >&2
      exit 1
    fi
  done
}

# start_bg LOG CMD…: runs CMD in the background, output to LOG; remembered for stop_all.
start_bg() {
  local log=$1
  shift
  "$@" > "$log" 2>&1 &
  pids+=($!)
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  pids=()
}

wait_for_status() {
  for _ in $(seq 100); do $BIN/tidalctl --controller "$1" status >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "the controller at $1 did not answer within 20 s" >&2
  return 1
}

# wait_for_node CONTROLLER NODE: until the node has registered and reports.
wait_for_node() {
  for _ in $(seq 100); do
    $BIN/tidalctl --controller "$1" status 2>/dev/null | grep -q "^$2 " && return 0
    sleep 0.2
  done
  echo "node $2 did not register with $1 within 20 s" >&2
  return 1
}

# wait_for_plan CONTROLLER [SECONDS]: until a plan sized from profiles is applied on every node
# and its workers are loaded (read from `status -o json`, the API's message, not the table);
# within SECONDS (default 30).
wait_for_plan() {
  local within=${2:-30}
  for _ in $(seq $((within * 5))); do
    $BIN/tidalctl --controller "$1" status -o json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
plan, nodes = s.get("plan") or {}, s.get("nodes", [])
workers = [w for n in nodes for w in n.get("workers", [])]
sys.exit(0 if any("planned" in note for note in plan.get("notes", []))
         and all(n.get("applied_epoch") == plan.get("epoch") for n in nodes)
         and workers and all(w.get("ready") for w in workers) else 1)' && return 0
    sleep 0.2
  done
  echo "no plan was applied within $within s" >&2
  return 1
}
