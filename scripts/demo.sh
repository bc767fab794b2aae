#!/usr/bin/env bash
# The main job: a local Tidal cluster (three controller replicas, one agent) serving real ONNX
# ResNets, adapting to a replayed slice of the Twitter trace; halfway through, the controller
# leader is killed with SIGKILL and the others carry on. At the end it prints the live result
# beside the simulator's prediction for the same slice, profiles and settings. Run through
# `make demo`, which builds first.
#
# Knobs (environment): those of scripts/cluster.sh (DEMO_TRACE, DEMO_SCALE, DEMO_SPEEDUP,
# DEMO_START, DEMO_DURATION, DEMO_SLO_MS, DEMO_INTERVAL_S, DEMO_WINDOW_S, DEMO_RESOLUTION),
# DEMO_KILL_LEADER (1: kill the controller leader halfway through the replay, the default;
# 0: leave it) and SIM_LOAD_TIME_S (model load time the prediction assumes; default: the
# longest the agent measured).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh

KILL_LEADER=${DEMO_KILL_LEADER:-1}
REPLICAS=(127.0.0.1:7000 127.0.0.1:7001 127.0.0.1:7002)
PEER_PORTS=(127.0.0.1:7010 127.0.0.1:7011 127.0.0.1:7012)
CTL=$(IFS=,; echo "${REPLICAS[*]}")
PEERS=$(for i in 0 1 2; do printf '%s%d=%s/%s' "$([ $i -gt 0 ] && echo ,)" $((i + 1)) "${REPLICAS[$i]}" "${PEER_PORTS[$i]}"; done)
AGENT=127.0.0.1:7100
AGENT_CONTROL=127.0.0.1:7101
OUT=.tidal/demo
CERTS=$OUT/certs

check_trace
check_ports 7000 7001 7002 7010 7011 7012 7100 7101
rm -rf "$OUT" && mkdir -p "$OUT"
trap stop_all EXIT INT TERM

# Every connection is mutual TLS: a CA for this demo, a certificate per process, and tidalctl
# as the admin.
make_certs "$CERTS" controller/1 controller/2 controller/3 agent/node-1 admin/demo
export TIDAL_TLS_CERT=$CERTS/admin-demo.pem TIDAL_TLS_KEY=$CERTS/admin-demo.key

step "1/7 models: ResNet18…152 at ${RESOLUTION}x${RESOLUTION} (real architectures, seeded weights)"
$BIN/tidalctl models generate --out models --resolution "$RESOLUTION" --variants "$TASK_VARIANTS"

step "2/7 starting three controller replicas ($CTL, adaptation every ${INTERVAL_S} s) and an agent ($AGENT), mutual TLS (certificates in $CERTS)"
declare -A replica_pid
for i in 0 1 2; do
  # shellcheck disable=SC2046
  start_bg "$OUT/controller-$((i + 1)).log" $BIN/tidal-controller --id $((i + 1)) --listen "${REPLICAS[$i]}" \
    --peer-listen "${PEER_PORTS[$i]}" --peers "$PEERS" $(tls_flags "$CERTS" controller/$((i + 1))) \
    --data-dir "$OUT/controller-$((i + 1))" --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S"
  replica_pid[$((i + 1))]=${pids[-1]}
done
# shellcheck disable=SC2046
start_bg "$OUT/agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --control-listen "$AGENT_CONTROL" \
  $(tls_flags "$CERTS" agent/node-1) --controller "$CTL" --model-dir models
wait_for_status "$CTL"
wait_for_node "$CTL" node-1
$BIN/tidalctl --controller "$CTL" controller list
echo "logs: $OUT/controller-{1,2,3}.log, $OUT/agent.log"

step "3/7 registering task 'resnet' (SLO ${SLO_MS} ms p99) with five variants"
$BIN/tidalctl --controller "$CTL" task register --name resnet --slo-ms "$SLO_MS" --model-dir models --variants "$TASK_VARIANTS"

step "4/7 profiling every variant on the idle agent under real cgroup quotas (1–2 cores, batch 1/4/8, 3 runs a point)"
$BIN/tidalctl --controller "$CTL" profile --agent "$AGENT_CONTROL" --task resnet --cores 1,2 --batches 1,4,8 \
  --duration-ms 1000 --repeat 3 --save "$OUT/profiles.json"
wait_for_plan "$CTL"
$BIN/tidalctl --controller "$CTL" status

wall=$((DURATION / SPEEDUP))
step "5/7 replaying trace seconds $START–$((START + DURATION)) × $SCALE, ${SPEEDUP}× faster (${wall} s); status every 20 s"
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
  --speedup "$SPEEDUP" --start "$START" --duration "$DURATION" --out "$OUT/requests.csv" \
  --summary-json "$OUT/live-tidal.json" > "$OUT/summary.txt"
kill "$watcher" 2>/dev/null || true
[ -n "${killer:-}" ] && kill "$killer" 2>/dev/null || true

step "6/7 plans the controller committed (a new leader re-commits the plan under its term)"
$BIN/tidalctl --controller "$CTL" history --limit 200 | grep -E "^plan|note" || true
# The prediction assumes the model loads the agent measured (the slowest), unless told.
load_s=${SIM_LOAD_TIME_S:-$(grep -o 'load_ms=[0-9]*' "$OUT/agent.log" | cut -d= -f2 | sort -n | tail -1 | awk '{ printf "%.1f", $1 / 1000 + 0.05 }')}
load_s=${load_s:-1}

step "7/7 live against the simulator's prediction (same slice, profiles and settings; model loads of ${load_s} s)"
echo "Live (requests in $OUT/requests.csv; trace scaled ×$SCALE, replayed ${SPEEDUP}× faster):"
cat "$OUT/summary.txt"
for seed in 1 2 3; do
  $BIN/tidalctl simulate --profiles "$OUT/profiles.json" --trace "$TRACE" --start "$START" --duration "$DURATION" \
    --scale "$SCALE" --speedup "$SPEEDUP" --cores 2 --interval "$INTERVAL_S" --lookback-s "$WINDOW_S" \
    --slo-ms "$SLO_MS" --policy tidal --load-time-s "$load_s" --cold-start --seed "$seed" \
    --csv "$OUT/sim-$seed.csv" > "$OUT/sim-$seed.txt" 2> "$OUT/sim-$seed.log"
done
python3 scripts/side_by_side.py "$OUT" tidal 1 2 3
