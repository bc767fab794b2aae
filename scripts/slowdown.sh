#!/usr/bin/env bash
# The slow-down test (issue 27): the machine runs SLOW× slower than the profiles the planner
# holds (default 1.2, a node 20 % slower than when it was profiled: a CPU hog, a quota scaled
# under the worker). The variants are profiled once; the controller is given those profiles
# made SLOW× faster; then the demo's slice is replayed live twice, the controller planning on
# them as stored (--no-profile-correction) and correcting them from the batches its workers
# serve (the default). Prints, per run, the SLO violations of the whole replay and of each
# 5-s window, and for the corrected run the plan epochs whose notes carry a factor.
#
# Knobs (environment): SLOW (default 1.2), ORDER (the runs' order, default "stored corrected"),
# PROFILES (a saved profile JSON to reuse instead of
# profiling), and as in scripts/demo.sh: DEMO_TRACE, DEMO_SCALE, DEMO_SPEEDUP, DEMO_START,
# DEMO_DURATION, DEMO_SLO_MS, DEMO_INTERVAL_S, DEMO_RESOLUTION. Build first (`make build`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh

SLOW=${SLOW:-1.2}
OUT=.tidal/slowdown
TASK=resnet
MODELS=models
CTL=127.0.0.1:7000
AGENT=127.0.0.1:7100
AGENT_CONTROL=127.0.0.1:7101
# A measurement on loopback, one machine: plaintext (the demo shows mutual TLS).
export TIDAL_INSECURE_PLAINTEXT=true

check_trace
check_ports 7000 7001 7100 7101
rm -rf "$OUT" && mkdir -p "$OUT"
trap stop_all EXIT INT TERM

step "models: $TASK_VARIANTS at ${RESOLUTION}x${RESOLUTION}"
$BIN/tidalctl models generate --out "$MODELS" --resolution "$RESOLUTION" --variants "$TASK_VARIANTS"

start_pair() {
  local name=$1
  shift
  start_bg "$OUT/$name-controller.log" $BIN/tidal-controller --listen "$CTL" --data-dir "$OUT/$name-controller" \
    --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S" --policy tidal "$@"
  start_bg "$OUT/$name-agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" \
    --model-dir "$MODELS"
  wait_for_status "$CTL"
  wait_for_node "$CTL" node-1
  $BIN/tidalctl --controller "$CTL" task register --name "$TASK" --slo-ms "$SLO_MS" --model-dir "$MODELS" \
    --variants "$TASK_VARIANTS" > /dev/null
}

if [ -n "${PROFILES:-}" ]; then
  cp "$PROFILES" "$OUT/profiles.json"
else
  step "profiling every variant once (3 runs a point; the node serves nothing meanwhile)"
  start_pair profile
  $BIN/tidalctl --controller "$CTL" profile --agent "$AGENT_CONTROL" --task "$TASK" --cores 1,2 --batches 1,4,8 \
    --duration-ms 1000 --repeat 3 --save "$OUT/profiles.json"
  stop_all
fi
# What the planner is told: every point SLOW× faster than measured.
python3 - "$OUT/profiles.json" "$OUT/profiles-fast.json" "$SLOW" <<'PY'
import json, sys
saved, out, slow = json.load(open(sys.argv[1])), sys.argv[2], float(sys.argv[3])
for v in saved["variants"]:
    for p in v["points"]:
        p["latency_p50_ms"] /= slow
        p["latency_p99_ms"] /= slow
        p["throughput_rps"] *= slow
json.dump(saved, open(out, "w"), indent=1)
PY

for mode in ${ORDER:-stored corrected}; do
  flag=""
  [ "$mode" = stored ] && flag=--no-profile-correction
  step "live, profiles ${SLOW}× too fast, $mode: trace seconds $START–$((START + DURATION)) × $SCALE, ${SPEEDUP}× faster"
  start_pair "$mode" $flag
  $BIN/tidalctl --controller "$CTL" profile --task "$TASK" --from "$OUT/profiles-fast.json" > /dev/null
  wait_for_plan "$CTL"
  $BIN/tidalctl --controller "$CTL" load --agent "$AGENT" --task "$TASK" --trace "$TRACE" --scale "$SCALE" \
    --speedup "$SPEEDUP" --start "$START" --duration "$DURATION" --out "$OUT/req-$mode.csv" > "$OUT/live-$mode.txt"
  $BIN/tidalctl --controller "$CTL" history --limit 200 > "$OUT/history-$mode.txt" || true
  stop_all
done

step "SLO violations (late, or refused) per 5 s of the replay, and over it"
python3 - "$OUT" "$SLO_MS" <<'PY'
import csv, sys
out, slo = sys.argv[1], float(sys.argv[2])
rows = {}
for mode in ("stored", "corrected"):
    per, total, bad = {}, 0, 0
    for r in csv.DictReader(open(f"{out}/req-{mode}.csv")):
        w = int(float(r["sent_s"]) // 5) * 5
        late = r["status"] != "Ok" or float(r["latency_ms"]) > slo
        n, v = per.get(w, (0, 0))
        per[w] = (n + 1, v + late)
        total, bad = total + 1, bad + late
    rows[mode] = per
    print(f"{mode:>9}: {bad} of {total} requests, {100 * bad / max(total, 1):.2f} %")
print("window s  stored  corrected")
for w in sorted(set(rows["stored"]) | set(rows["corrected"])):
    print(f"{w:>8}  {rows['stored'].get(w, (0, 0))[1]:>6}  {rows['corrected'].get(w, (0, 0))[1]:>9}")
PY
step "the corrected run's plans: epochs whose notes carry a factor"
grep -E "^plan epoch|runs at .* its profile" "$OUT/history-corrected.txt" || true
