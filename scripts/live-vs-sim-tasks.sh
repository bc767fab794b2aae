#!/usr/bin/env bash
# Live = simulated with several tasks on one cluster: each task replays its own slice of the
# trace (shifted in time, its own scale) live, all at once, on one controller and one agent
# (real ONNX ResNets), once per policy; then the same slices in `tidalctl simulate --tasks`
# with the profiles measured live, and both side by side per task: SLO violations, p99,
# served accuracy and mean cores.
#
# Every task serves the same variants (one profile run serves them all; profiles are per
# variant). A worker takes whole cores, so a 2-core agent carries at most two tasks; give the
# agent more with AGENT_CORES only where the machine has them.
#
# Knobs (environment): TASKS (default "a:0:0.5 b:3600:0.4": name:offset:scale, the offset in
# trace seconds after DEMO_START), POLICIES (default tidal; any joint policy), AGENT_CORES
# (default 2), and as in scripts/demo.sh: DEMO_TRACE, DEMO_SPEEDUP, DEMO_START, DEMO_DURATION,
# DEMO_SLO_MS, DEMO_INTERVAL_S, DEMO_RESOLUTION; SIM_LOAD_TIME_S (default 1 s), SIM_SEEDS
# (default 1 2 3). Run through `make live-vs-sim-tasks`, which builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh

TASKS=${TASKS:-a:0:0.5 b:3600:0.4}
POLICIES=${POLICIES:-tidal}
AGENT_CORES=${AGENT_CORES:-2}
SIM_LOAD_TIME_S=${SIM_LOAD_TIME_S:-1}
SIM_SEEDS=${SIM_SEEDS:-1 2 3}
VARIANTS=resnet18,resnet34,resnet50
OUT=.tidal/live-vs-sim-tasks
CTL=127.0.0.1:7000
AGENT=127.0.0.1:7100
AGENT_CONTROL=127.0.0.1:7101
# A measurement on loopback, one machine: plaintext (the demo shows mutual TLS).
export TIDAL_INSECURE_PLAINTEXT=true

read -r -a task_list <<< "$TASKS"
names=()
for t in "${task_list[@]}"; do
  IFS=: read -r name offset scale <<< "$t"
  if [ -z "$name" ] || ! [[ "$offset" =~ ^[0-9]+$ ]] || [ -z "$scale" ]; then
    echo "TASKS: $t is not name:offset:scale (e.g. a:0:0.5)" >&2
    exit 2
  fi
  names+=("$name")
done

check_trace
check_ports 7000 7001 7100 7101
rm -rf "$OUT" && mkdir -p "$OUT"
trap stop_all EXIT INT TERM

step "models: $VARIANTS at ${RESOLUTION}x${RESOLUTION}"
$BIN/tidalctl models generate --out models --resolution "$RESOLUTION" --variants "$VARIANTS"

# A fresh controller and agent for one run; every task registered.
start_pair() {
  local name=$1 policy=$2
  start_bg "$OUT/$name-controller.log" $BIN/tidal-controller --listen "$CTL" --data-dir "$OUT/$name-controller" \
    --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S" --policy "$policy"
  start_bg "$OUT/$name-agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" \
    --model-dir models --cores "$AGENT_CORES"
  wait_for_status "$CTL"
  wait_for_node "$CTL" node-1
  for task in "${names[@]}"; do
    $BIN/tidalctl --controller "$CTL" task register --name "$task" --slo-ms "$SLO_MS" --model-dir models \
      --variants "$VARIANTS" >/dev/null
  done
}

step "profiling every variant once (3 runs a point; the node serves nothing meanwhile)"
start_pair profile tidal
$BIN/tidalctl --controller "$CTL" profile --agent "$AGENT_CONTROL" --task "${names[0]}" --cores 1,2 \
  --batches 1,4,8 --duration-ms 1000 --repeat 3 --save "$OUT/profiles.json"
stop_all

IFS=, read -r -a policy_list <<< "$POLICIES"
for policy in "${policy_list[@]}"; do
  step "live: $policy, ${#names[@]} tasks at once, trace seconds from $START for $DURATION, ${SPEEDUP}× faster"
  start_pair "$policy" "$policy"
  for task in "${names[@]}"; do
    $BIN/tidalctl --controller "$CTL" profile --task "$task" --from "$OUT/profiles.json" >/dev/null
  done
  wait_for_plan "$CTL"
  loads=()
  seed=1
  for t in "${task_list[@]}"; do
    IFS=: read -r name offset scale <<< "$t"
    # Each task its own arrival seed, as the simulator draws each task's arrivals apart.
    $BIN/tidalctl --controller "$CTL" load --agent "$AGENT" --task "$name" --trace "$TRACE" --scale "$scale" \
      --speedup "$SPEEDUP" --start "$((START + offset))" --duration "$DURATION" --seed "$seed" \
      --summary-json "$OUT/live-$policy-$name.json" > "$OUT/live-$policy-$name.txt" 2>&1 &
    loads+=($!)
    seed=$((seed + 1))
  done
  failed=0
  for pid in "${loads[@]}"; do wait "$pid" || failed=1; done
  [ "$failed" = 0 ] || { echo "a load failed: see $OUT/live-$policy-*.txt" >&2; exit 1; }
  $BIN/tidalctl --controller "$CTL" history --limit 200 > "$OUT/history-$policy.txt" || true
  stop_all
done

step "simulated: the same slices, profiles and settings, seeds $SIM_SEEDS, model loads of ${SIM_LOAD_TIME_S} s"
{
  echo "cores = $AGENT_CORES"
  for t in "${task_list[@]}"; do
    IFS=: read -r name offset scale <<< "$t"
    printf '\n[[tasks]]\nname = "%s"\ntrace = "%s"\noffset = %s\nscale = %s\nslo_ms = %s\nprofiles = "%s"\n' \
      "$name" "$(realpath "$TRACE")" "$offset" "$scale" "$SLO_MS" "$(realpath "$OUT/profiles.json")"
  done
} > "$OUT/tasks.toml"
for seed in $SIM_SEEDS; do
  $BIN/tidalctl simulate --tasks "$OUT/tasks.toml" --start "$START" --duration "$DURATION" --speedup "$SPEEDUP" \
    --interval "$INTERVAL_S" --lookback-s "$WINDOW_S" --policy "$POLICIES" --load-time-s "$SIM_LOAD_TIME_S" \
    --cold-start --seed "$seed" --csv "$OUT/sim-$seed.csv" > "$OUT/sim-$seed.txt" 2> "$OUT/sim-$seed.log"
done

step "live vs simulated, per task"
python3 scripts/side_by_side.py --tasks "$(IFS=,; echo "${names[*]}")" "$OUT" "$POLICIES" $SIM_SEEDS \
  | tee "$OUT/table.md"
