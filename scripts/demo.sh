#!/usr/bin/env bash
# The main job: a local Tidal cluster (three controller replicas, one agent) serving real ONNX
# ResNets, adapting to a replayed slice of the Twitter trace; halfway through, the controller
# leader is killed with SIGKILL and the others carry on. Run through `make demo`, which builds
# first.
#
# Knobs (environment): DEMO_SCALE (rate factor, default 0.75), DEMO_SPEEDUP (trace seconds per
# wall second, default 120), DEMO_START / DEMO_DURATION (trace slice, in trace seconds; default
# 05:00–11:00 of day 1), DEMO_SLO_MS (default 250), DEMO_INTERVAL_S (adaptation interval,
# default 10), DEMO_RESOLUTION (model input pixels, default 64), DEMO_KILL_LEADER (1: kill the
# controller leader halfway through the replay, the default; 0: leave it).
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=./target/release
TRACE=${DEMO_TRACE:-data/twitter-trace-rps.txt.gz}
SCALE=${DEMO_SCALE:-0.75}
SPEEDUP=${DEMO_SPEEDUP:-120}
START=${DEMO_START:-18000}
DURATION=${DEMO_DURATION:-21600}
SLO_MS=${DEMO_SLO_MS:-250}
INTERVAL_S=${DEMO_INTERVAL_S:-10}
RESOLUTION=${DEMO_RESOLUTION:-64}
KILL_LEADER=${DEMO_KILL_LEADER:-1}
REPLICAS=(127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002)
CTL=$(IFS=,; echo "${REPLICAS[*]}")
PEERS=$(for i in 0 1 2; do printf '%s%d=%s' "$([ $i -gt 0 ] && echo ,)" $((i + 1)) "${REPLICAS[$i]}"; done)
AGENT=127.0.0.1:7100
OUT=.tidal/demo
VARIANTS=resnet18,resnet34,resnet50,resnet101,resnet152

if [ ! -f "$TRACE" ]; then
  echo "demo: the trace $TRACE is missing (set DEMO_TRACE to a file of one integer per line)" >&2
  exit 1
fi
for port in 7000 7001 7002 7100; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo: port $port is in use; stop what listens there (another demo?) and retry" >&2
    exit 1
  fi
done

rm -rf "$OUT" && mkdir -p "$OUT"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 models: ResNet18…152 at ${RESOLUTION}x${RESOLUTION} (real architectures, seeded weights)"
$BIN/tidalctl models generate --out models --resolution "$RESOLUTION" --variants "$VARIANTS"

step "2/6 starting three controller replicas ($CTL, adaptation every ${INTERVAL_S} s) and an agent ($AGENT)"
declare -A replica_pid
for i in 0 1 2; do
  $BIN/tidal-controller --id $((i + 1)) --listen "${REPLICAS[$i]}" --peers "$PEERS" \
    --data-dir "$OUT/controller-$((i + 1))" --interval-s "$INTERVAL_S" --forecast-window-s 20 \
    > "$OUT/controller-$((i + 1)).log" 2>&1 &
  pids+=($!)
  replica_pid[$((i + 1))]=$!
done
$BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" --model-dir models \
  > "$OUT/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do $BIN/tidalctl --controller "$CTL" status >/dev/null 2>&1 && break; sleep 0.2; done
$BIN/tidalctl --controller "$CTL" controller list
echo "logs: $OUT/controller-{1,2,3}.log, $OUT/agent.log"

step "3/6 registering task 'resnet' (SLO ${SLO_MS} ms p99) with five variants"
$BIN/tidalctl --controller "$CTL" task register --name resnet --slo-ms "$SLO_MS" --model-dir models --variants "$VARIANTS"

step "4/6 profiling every variant on the agent under real cgroup quotas (1–2 cores, batch 1/4/8)"
$BIN/tidalctl --controller "$CTL" profile --agent "$AGENT" --task resnet --cores 1,2 --batches 1,4,8 --duration-ms 1000
sleep 2
$BIN/tidalctl --controller "$CTL" status

wall=$(awk -v d="$DURATION" -v s="$SPEEDUP" 'BEGIN { printf "%d", d / s }')
step "5/6 replaying trace seconds $START–$((START + DURATION)) × $SCALE, ${SPEEDUP}× faster (~${wall} s); status every 20 s"
(
  while sleep 20; do
    echo
    echo "---- $(date +%T) ----"
    $BIN/tidalctl --controller "$CTL" status 2>/dev/null || true
  done
) &
watcher=$!
if [ "$KILL_LEADER" = 1 ]; then
  (
    sleep $((wall / 2))
    leader=$($BIN/tidalctl --controller "$CTL" controller list | grep -o 'leader [0-9]*' | head -1 | cut -d' ' -f2)
    if [ -n "$leader" ]; then
      echo
      echo "---- $(date +%T) killing the controller leader, replica $leader (kill -9) ----"
      kill -9 "${replica_pid[$leader]}"
      sleep 3
      $BIN/tidalctl --controller "$CTL" controller list || true
    fi
  ) &
  killer=$!
fi
$BIN/tidalctl --controller "$CTL" load --agent "$AGENT" --task resnet --trace "$TRACE" --scale "$SCALE" \
  --speedup "$SPEEDUP" --start "$START" --duration "$DURATION" --out "$OUT/requests.csv" > "$OUT/summary.txt"
kill "$watcher" 2>/dev/null || true
[ -n "${killer:-}" ] && kill "$killer" 2>/dev/null || true

step "6/6 plans the controller committed (a new leader re-commits the plan under its term)"
$BIN/tidalctl --controller "$CTL" history --limit 100 | grep -E "^plan|note" || true
echo
echo "Summary (requests in $OUT/requests.csv; trace scaled ×$SCALE, replayed ${SPEEDUP}× faster):"
cat "$OUT/summary.txt"
