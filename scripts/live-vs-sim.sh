#!/usr/bin/env bash
# Live = simulated, measured: replays a slice of the trace live on a local cluster (one
# controller, one agent, real ONNX ResNets) once per policy, then the same slice in the
# simulator with the profiles measured live, and prints both side by side: SLO violations,
# p99, served accuracy, mean cores and plans committed.
#
# The variants are profiled once (3 runs per point, saved to $OUT/profiles.json) and every
# live run and the simulator use those very profiles.
#
# PIPELINE=video replays IPA's video pipeline instead: yolov5n/yolov5s (64×64) detect, and
# resnet18/resnet34 (32×32) classify the two most confident objects of each frame, cut out of
# it (see deploy/video-pipeline.toml); policies tidal, ipa, fa2-low and fa2-high.
#
# Knobs (environment): POLICIES (default tidal,infadapter,vpa-resnet50), and as in
# scripts/demo.sh: DEMO_TRACE, DEMO_SCALE, DEMO_SPEEDUP, DEMO_START, DEMO_DURATION,
# DEMO_SLO_MS, DEMO_INTERVAL_S, DEMO_RESOLUTION; SIM_LOAD_TIME_S (model load time the
# simulator assumes, default 1 s: what these small models take here); SIM_SEEDS (default 1 2 3);
# OUT (where results go, default .tidal/live-vs-sim); PROFILES (a profiles file saved by an
# earlier run: plan on it rather than profile anew, so two runs compare on the same figures);
# CONTROLLER_FLAGS (more flags for the controller, e.g. --no-slack-routing) and SIM_FLAGS (for
# the simulator, e.g. the same).
# Run through `make live-vs-sim`, which builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh

PIPELINE=${PIPELINE:-}
if [ "$PIPELINE" = video ]; then
  POLICIES=${POLICIES:-tidal,ipa,fa2-low,fa2-high}
  OUT=${OUT:-.tidal/live-vs-sim-video}
  TASK=video
else
  POLICIES=${POLICIES:-tidal,infadapter,vpa-resnet50}
  OUT=${OUT:-.tidal/live-vs-sim}
  TASK=resnet
fi
SIM_LOAD_TIME_S=${SIM_LOAD_TIME_S:-1}
SIM_SEEDS=${SIM_SEEDS:-1 2 3}
PROFILES=${PROFILES:-}
CONTROLLER_FLAGS=${CONTROLLER_FLAGS:-}
SIM_FLAGS=${SIM_FLAGS:-}
if [ -n "$PROFILES" ] && [ ! -f "$PROFILES" ]; then
  echo "PROFILES=$PROFILES: no such file" >&2
  exit 2
fi
CTL=127.0.0.1:7000
AGENT=127.0.0.1:7100
AGENT_CONTROL=127.0.0.1:7101
# A measurement on loopback, one machine: plaintext (the demo shows mutual TLS).
export TIDAL_INSECURE_PLAINTEXT=true

check_trace
check_ports 7000 7001 7100 7101
rm -rf "$OUT" && mkdir -p "$OUT"
trap stop_all EXIT INT TERM

if [ "$PIPELINE" = video ]; then
  MODELS=models/video
  step "models: yolov5n,yolov5s at 64x64, resnet18,resnet34 at 32x32"
  $BIN/tidalctl models generate --out "$MODELS" --resolution 64 --variants yolov5n,yolov5s
  $BIN/tidalctl models generate --out "$MODELS" --resolution 32 --variants resnet18,resnet34
  cat > "$OUT/video.toml" <<'TOML'
name = "video"
slo_ms = 250
[[stages]]
name = "detect"
variants = ["yolov5n", "yolov5s"]
[[stages]]
name = "classify"
variants = ["resnet18", "resnet34"]
crops = 2
TOML
  sed -i "s/^slo_ms = .*/slo_ms = $SLO_MS/" "$OUT/video.toml"
  register() { $BIN/tidalctl --controller "$CTL" task register --file "$OUT/video.toml" --model-dir "$MODELS"; }
else
  MODELS=models
  step "models: $TASK_VARIANTS at ${RESOLUTION}x${RESOLUTION}"
  $BIN/tidalctl models generate --out "$MODELS" --resolution "$RESOLUTION" --variants "$TASK_VARIANTS"
  register() {
    $BIN/tidalctl --controller "$CTL" task register --name "$TASK" --slo-ms "$SLO_MS" --model-dir "$MODELS" \
      --variants "$TASK_VARIANTS"
  }
fi

# A fresh controller and agent for one run; the task registered.
start_pair() {
  local name=$1 policy=$2
  start_bg "$OUT/$name-controller.log" $BIN/tidal-controller --listen "$CTL" --data-dir "$OUT/$name-controller" \
    --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S" --policy "$policy" $CONTROLLER_FLAGS
  start_bg "$OUT/$name-agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" \
    --model-dir "$MODELS"
  wait_for_status "$CTL"
  wait_for_node "$CTL" node-1
  register >/dev/null
}

if [ -n "$PROFILES" ]; then
  step "profiles from $PROFILES (not measured anew)"
  cp "$PROFILES" "$OUT/profiles.json"
else
  step "profiling every variant once (3 runs a point; the node serves nothing meanwhile)"
  start_pair profile tidal
  $BIN/tidalctl --controller "$CTL" profile --agent "$AGENT_CONTROL" --task "$TASK" --cores 1,2 --batches 1,4,8 \
    --duration-ms 1000 --repeat 3 --save "$OUT/profiles.json"
  stop_all
fi

IFS=, read -r -a policy_list <<< "$POLICIES"
for policy in "${policy_list[@]}"; do
  step "live: $policy, trace seconds $START–$((START + DURATION)) × $SCALE, ${SPEEDUP}× faster ($((DURATION / SPEEDUP)) s)"
  start_pair "$policy" "$policy"
  $BIN/tidalctl --controller "$CTL" profile --task "$TASK" --from "$OUT/profiles.json" >/dev/null
  wait_for_plan "$CTL"
  $BIN/tidalctl --controller "$CTL" load --agent "$AGENT" --task "$TASK" --trace "$TRACE" --scale "$SCALE" \
    --speedup "$SPEEDUP" --start "$START" --duration "$DURATION" --summary-json "$OUT/live-$policy.json" \
    --out "$OUT/requests-$policy.csv" > "$OUT/live-$policy.txt"
  $BIN/tidalctl --controller "$CTL" history --limit 200 > "$OUT/history-$policy.txt" || true
  stop_all
done

step "simulated: the same slice, profiles and settings, seeds $SIM_SEEDS, model loads of ${SIM_LOAD_TIME_S} s"
for seed in $SIM_SEEDS; do
  $BIN/tidalctl simulate --profiles "$OUT/profiles.json" --trace "$TRACE" --start "$START" --duration "$DURATION" \
    --scale "$SCALE" --speedup "$SPEEDUP" --cores 2 --interval "$INTERVAL_S" --lookback-s "$WINDOW_S" \
    --slo-ms "$SLO_MS" --policy "$POLICIES" --load-time-s "$SIM_LOAD_TIME_S" --cold-start --seed "$seed" $SIM_FLAGS \
    --csv "$OUT/sim-$seed.csv" > "$OUT/sim-$seed.txt" 2> "$OUT/sim-$seed.log"
done

step "live vs simulated"
python3 scripts/side_by_side.py "$OUT" "$POLICIES" $SIM_SEEDS | tee "$OUT/table.md"
