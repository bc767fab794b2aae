#!/usr/bin/env bash
# perf_analyzer's unary gRPC calls against its --streaming ones (ModelStreamInfer) on one Tidal
# agent under a fixed plan (agent/examples/static_plan.rs: one worker, 2 cores, batches of up
# to B), in interleaved pairs (unary, then streaming, PAIRS times), and each pair's ratio
# (results/peers.md). Batch 1 at concurrency 2, batches of up to 8 at concurrency 16.
# Knobs: VARIANTS (resnet18,resnet50), PAIRS (3), OUT (.tidal/streaming).
# Needs a release build with examples (`cargo build --release --workspace --all-targets`) and
# the client tools (scripts/client-tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VARIANTS=${VARIANTS:-resnet18,resnet50}
PAIRS=${PAIRS:-3}
OUT=${OUT:-.tidal/streaming}
export TIDAL_ORT_LIB=${TIDAL_ORT_LIB:-$PWD/.tidal/lib/libonnxruntime.so}
PA=.tidal/clients/bin/perf_analyzer
mkdir -p "$OUT"
./target/release/tidalctl models generate --out "$OUT/models" --variants "$VARIANTS" --resolution 64 >/dev/null

ratios() {
  python3 - "$OUT/pairs.txt" <<'EOF'
import collections, statistics, sys
pairs = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    variant, batch, pair, mode, rps, p50, p99 = line.split()
    pairs[(variant, batch, pair)][mode] = (float(rps), float(p99))
by = collections.defaultdict(list)
for (variant, batch, _), m in pairs.items():
    if len(m) == 2:
        by[(variant, batch)].append((m["streaming"][0] / m["unary"][0], m["streaming"][1] / m["unary"][1]))
for (variant, batch), r in sorted(by.items()):
    t, q = [x[0] for x in r], [x[1] for x in r]
    print(f"{variant} batch<={batch}: streaming/unary throughput {statistics.median(t):.3f} "
          f"({min(t):.3f}-{max(t):.3f}), p99 {statistics.median(q):.3f} ({min(q):.3f}-{max(q):.3f}), {len(r)} pairs")
EOF
}

: > "$OUT/pairs.txt"
for variant in ${VARIANTS//,/ }; do
  for batch in 1 8; do
    ./target/release/examples/static_plan "$OUT/models" "$variant" 2000 "$batch" > "$OUT/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 120); do grep -q serving "$OUT/server.log" && break; sleep 1; done
    concurrency=$([ "$batch" = 1 ] && echo 2 || echo 16)
    for pair in $(seq 1 "$PAIRS"); do
      for mode in unary streaming; do
        extra=(); [ "$mode" = streaming ] && extra=(--streaming)
        "$PA" -m classify -u 127.0.0.1:7199 -i grpc "${extra[@]}" --concurrency-range "$concurrency" \
          --measurement-mode count_windows --measurement-request-count 300 -s 100 --max-trials 3 \
          -f "$OUT/pa.csv" > "$OUT/pa.log" 2>&1 || { echo "$variant batch<=$batch $mode failed:"; tail -3 "$OUT/pa.log"; continue; }
        python3 - "$OUT/pa.csv" "$variant $batch $pair $mode" <<'EOF' | tee -a "$OUT/pairs.txt"
import csv, sys
r = next(csv.DictReader(open(sys.argv[1])))
print(sys.argv[2], f'{float(r["Inferences/Second"]):.1f}', f'{float(r["p50 latency"]) / 1000:.2f}',
      f'{float(r["p99 latency"]) / 1000:.2f}')
EOF
      done
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
ratios
