#!/usr/bin/env bash
# IPA's comparison on its five pipelines, measured here (results/ipa-pipelines.md): video (from
# the profiles of its live run), and each text and speech pipeline of deploy/ (audio-sentiment,
# audio-qa, sum-qa, nlp) generated as its file says, registered with a local controller and
# agent, and every variant of every stage profiled on this machine (1 and 2 cores, batches 1,
# 2 and 4; a stage that writes text at one token and at its most; a variant profiled for one
# pipeline is reused for the next). Then ipa, fa2-low, fa2-high and tidal are simulated over a
# day of the Twitter trace on SIM_CORES cores, the trace scaled so that its peak is SIM_LOAD of
# what the cores carry with every stage at its lightest variant unbatched: the heavier variants
# cannot carry the peak, and the policies differ in how they trade accuracy for it.
#
# With LIVE=1, a compressed slice is also replayed live on this machine (one agent of 2 cores)
# once per policy, with the user's kind of requests (texts of dictionary words, two seconds of
# synthetic audio; `tidalctl load --samples`), and simulated beside it with the same profiles
# (seeds 1-3), as scripts/live-vs-sim.sh does for the video pipeline: by default trace seconds
# 26 880-27 780, 6x faster (150 s), scaled so its peak is LIVE_LOAD (0.7) of what two cores
# carry at the lightest variants.
#
# Knobs (environment): PIPELINES (default all five), POLICIES (default ipa,fa2-low,fa2-high,tidal),
# SIM_CORES (32), SIM_LOAD (0.7), SIM_START / SIM_DURATION (trace seconds, default day 2),
# SIM_LOAD_TIME_S (the model load time the simulator assumes, 5 s), PROFILE_REPEAT (runs per
# profile point, 3), OUT (.tidal/ipa-pipelines);
# LIVE, LIVE_LOAD, and DEMO_START, DEMO_DURATION, DEMO_SPEEDUP, DEMO_INTERVAL_S, DEMO_WINDOW_S as
# scripts/demo.sh takes them.
# Model files (several GB) are generated in $OUT/models and removed once no pipeline left
# needs them. Run through `make ipa-pipelines`, which builds first.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/cluster.sh

PIPELINES=${PIPELINES:-video audio-sentiment audio-qa sum-qa nlp}
POLICIES=${POLICIES:-ipa,fa2-low,fa2-high,tidal}
OUT=${OUT:-.tidal/ipa-pipelines}
SIM_CORES=${SIM_CORES:-32}
SIM_LOAD=${SIM_LOAD:-0.7}
SIM_START=${SIM_START:-86400}
SIM_DURATION=${SIM_DURATION:-86400}
SIM_LOAD_TIME_S=${SIM_LOAD_TIME_S:-5}
PROFILE_REPEAT=${PROFILE_REPEAT:-3}
LIVE=${LIVE:-}
LIVE_LOAD=${LIVE_LOAD:-0.7}
START=${DEMO_START:-26880}
DURATION=${DEMO_DURATION:-900}
MODELS=$OUT/models
CTL=127.0.0.1:7000
AGENT=127.0.0.1:7100
AGENT_CONTROL=127.0.0.1:7101
# A measurement on loopback, one machine: plaintext (the demo shows mutual TLS).
export TIDAL_INSECURE_PLAINTEXT=true

check_trace
check_ports 7000 7001 7100 7101
mkdir -p "$OUT" "$MODELS"
trap stop_all EXIT INT TERM

# The models a deploy file's comment says to generate, generated into $MODELS.
generate() {
  grep '^#   tidalctl models generate' "$1" | sed 's/^#   tidalctl //; s/--out models/--out MODELS/' |
    while read -r line; do
      # shellcheck disable=SC2086
      $BIN/tidalctl ${line//MODELS/$MODELS}
    done
}

# IPA's video pipeline (detection, then classification of each frame's two most confident
# objects) is simulated with the profiles its live run measured (results/video-profiles.json,
# scripts/live-vs-sim.sh with PIPELINE=video; results/live-vs-sim-video.md has it live).
if [[ " $PIPELINES " == *" video "* ]]; then
  dir=$OUT/video
  mkdir -p "$dir"
  cp results/video-profiles.json "$dir/profiles.json"
  step "video: a day simulated, $POLICIES on 2 cores (its small models carry thousands of frames a second)"
  scale=$(python3 scripts/ipa_pipelines.py scale "$dir/profiles.json" "$TRACE" "$SIM_START" "$SIM_DURATION" \
    2 "$SIM_LOAD" 2> "$dir/scale.txt")
  cat "$dir/scale.txt"
  $BIN/tidalctl simulate --profiles "$dir/profiles.json" --trace "$TRACE" --start "$SIM_START" \
    --duration "$SIM_DURATION" --scale "$scale" --cores 2 --slo-ms 250 --policy "$POLICIES" \
    --load-time-s 1 --csv "$dir/sim.csv" | tee "$dir/sim.txt"
  printf '{"start": %s, "duration": %s, "scale": %s, "slo_ms": 250, "cores": %s}\n' \
    "$SIM_START" "$SIM_DURATION" "$scale" 2 > "$dir/meta.json"
fi

remaining=(${PIPELINES//video/})
for pipeline in ${PIPELINES//video/}; do
  remaining=("${remaining[@]:1}")
  file=deploy/$pipeline.toml
  task=$(sed -n 's/^name = "\(.*\)"/\1/p' "$file" | head -1)
  slo_ms=$(sed -n 's/^slo_ms = \([0-9]*\)/\1/p' "$file" | head -1)
  dir=$OUT/$pipeline
  mkdir -p "$dir"

  step "$pipeline: models"
  # Profiled once per variant: a variant another pipeline measured is not measured again.
  reused=false
  if [ -s "$dir/profiles.json" ] || python3 scripts/ipa_pipelines.py reuse "$file" "$OUT" "$dir/profiles.json"; then
    reused=true
  fi
  $reused || generate "$file"
  # Every request runs every stage: the planner and the simulator plan a stage requests may
  # skip as if none did, and the generated language identifier (random weights) names most
  # texts English, which would skip the translation the comparison is about (IPA's texts are
  # French). So the NLP pipeline is measured translating every text.
  sed '/^\[stages.skip\]/,/^pass = /d' "$file" > "$dir/task.toml"
  file=$dir/task.toml

  if ! $reused; then
    step "$pipeline: profiling every variant (the node serves nothing meanwhile)"
    start_bg "$dir/controller.log" $BIN/tidal-controller --listen "$CTL" --data-dir "$dir/controller" \
      --interval-s 5 --policy tidal
    start_bg "$dir/agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" \
      --model-dir "$MODELS"
    wait_for_status "$CTL"
    wait_for_node "$CTL" node-1
    $BIN/tidalctl --controller "$CTL" task register --file "$file" --model-dir "$MODELS" > /dev/null
    $BIN/tidalctl --controller "$CTL" profile --agent "$AGENT_CONTROL" --task "$task" --cores 1,2 \
      --batches 1,2,4 --duration-ms 1000 --repeat "$PROFILE_REPEAT" --save "$dir/profiles.json.part" | tee "$dir/profile.txt"
    mv "$dir/profiles.json.part" "$dir/profiles.json"
    stop_all
    rm -rf "$dir/controller"
  fi

  step "$pipeline: a day simulated, $POLICIES on $SIM_CORES cores"
  scale=$(python3 scripts/ipa_pipelines.py scale "$dir/profiles.json" "$TRACE" "$SIM_START" "$SIM_DURATION" \
    "$SIM_CORES" "$SIM_LOAD" 2> "$dir/scale.txt")
  cat "$dir/scale.txt"
  $BIN/tidalctl simulate --profiles "$dir/profiles.json" --trace "$TRACE" --start "$SIM_START" \
    --duration "$SIM_DURATION" --scale "$scale" --cores "$SIM_CORES" --slo-ms "$slo_ms" --policy "$POLICIES" \
    --load-time-s "$SIM_LOAD_TIME_S" --csv "$dir/sim.csv" | tee "$dir/sim.txt"
  printf '{"start": %s, "duration": %s, "scale": %s, "slo_ms": %s, "cores": %s}\n' \
    "$SIM_START" "$SIM_DURATION" "$scale" "$slo_ms" "$SIM_CORES" > "$dir/meta.json"

  stages=$(grep -c '^\[\[stages\]\]' "$file" || true)
  if [ -n "$LIVE" ] && [ "$stages" -gt 2 ]; then
    # Every stage runs at least one worker of at least one core.
    mkdir -p "$dir/live"
    echo "not run: its $stages stages need at least $stages cores, and the live node has 2" | tee "$dir/live/skipped.txt"
  elif [ -n "$LIVE" ]; then
    $reused && generate "$file"
    live=$dir/live
    rm -rf "$live" && mkdir -p "$live"
    python3 scripts/ipa_pipelines.py samples "$pipeline" "$live/samples"
    live_scale=$(python3 scripts/ipa_pipelines.py scale "$dir/profiles.json" "$TRACE" "$START" "$DURATION" 2 \
      "$LIVE_LOAD" 2> "$live/scale.txt")
    cat "$live/scale.txt"
    IFS=, read -r -a policy_list <<< "$POLICIES"
    for policy in "${policy_list[@]}"; do
      step "$pipeline live: $policy, trace seconds $START-$((START + DURATION)) x $live_scale, ${SPEEDUP}x faster"
      start_bg "$live/$policy-controller.log" $BIN/tidal-controller --listen "$CTL" \
        --data-dir "$live/$policy-controller" --interval-s "$INTERVAL_S" --forecast-window-s "$WINDOW_S" \
        --policy "$policy"
      start_bg "$live/$policy-agent.log" $BIN/tidal-agent serve --node node-1 --listen "$AGENT" --controller "$CTL" \
        --model-dir "$MODELS"
      wait_for_status "$CTL"
      wait_for_node "$CTL" node-1
      $BIN/tidalctl --controller "$CTL" task register --file "$file" --model-dir "$MODELS" > /dev/null
      $BIN/tidalctl --controller "$CTL" profile --task "$task" --from "$dir/profiles.json" > /dev/null
      wait_for_plan "$CTL" 300
      $BIN/tidalctl --controller "$CTL" load --agent "$AGENT" --task "$task" --trace "$TRACE" --scale "$live_scale" \
        --speedup "$SPEEDUP" --start "$START" --duration "$DURATION" --samples "$live/samples" \
        --summary-json "$live/live-$policy.json" > "$live/live-$policy.txt"
      $BIN/tidalctl --controller "$CTL" history --limit 200 > "$live/history-$policy.txt" || true
      stop_all
      rm -rf "$live/$policy-controller"
    done
    for seed in 1 2 3; do
      $BIN/tidalctl simulate --profiles "$dir/profiles.json" --trace "$TRACE" --start "$START" \
        --duration "$DURATION" --scale "$live_scale" --speedup "$SPEEDUP" --cores 2 --interval "$INTERVAL_S" \
        --lookback-s "$WINDOW_S" --slo-ms "$slo_ms" --policy "$POLICIES" --load-time-s "$SIM_LOAD_TIME_S" \
        --cold-start --seed "$seed" --csv "$live/sim-$seed.csv" > "$live/sim-$seed.txt" 2> "$live/sim-$seed.log"
    done
    python3 scripts/side_by_side.py "$live" "$POLICIES" 1 2 3 | tee "$live/table.md"
  fi

  # Models no pipeline still to come needs make room for the next ones.
  for model in "$MODELS"/*.onnx; do
    [ -e "$model" ] || continue
    name=$(basename "$model" .onnx)
    needed=false
    for next in "${remaining[@]}"; do
      grep -q "\"$name\"" "deploy/$next.toml" && needed=true
    done
    $needed || rm -f "$MODELS/$name".*
  done
done

step "the tables"
python3 scripts/ipa_pipelines.py table "$OUT" $PIPELINES | tee "$OUT/tables.md"
