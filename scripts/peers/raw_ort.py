#!/usr/bin/env python3
"""ONNX Runtime alone, in one process: the limit the serving systems are measured against
(scripts/peers.sh). Runs one variant back to back at each batch size with the given threads and
prints one line per batch: `raw batch=B throughput=X p50_ms=Y p99_ms=Z` (samples per second;
latency of one run)."""

import argparse
import time

import numpy as np
from ort_session import open_session


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--shape", default="3,64,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,4,8,16")
    p.add_argument("--seconds", type=float, default=5.0, help="per batch size")
    a = p.parse_args()
    session = open_session(a.model, a.threads)
    name = session.get_inputs()[0].name
    shape = [int(d) for d in a.shape.split(",")]
    for b in [int(x) for x in a.batches.split(",")]:
        x = np.random.default_rng(1).random([b] + shape, dtype=np.float32)
        for _ in range(5):
            session.run(None, {name: x})
        runs = []
        started = time.perf_counter()
        while time.perf_counter() - started < a.seconds:
            t = time.perf_counter()
            session.run(None, {name: x})
            runs.append(time.perf_counter() - t)
        took = time.perf_counter() - started
        runs.sort()
        p50, p99 = runs[len(runs) // 2], runs[min(len(runs) - 1, int(len(runs) * 0.99))]
        print(f"raw batch={b} throughput={b * len(runs) / took:.1f} p50_ms={p50 * 1e3:.2f} p99_ms={p99 * 1e3:.2f}", flush=True)


if __name__ == "__main__":
    main()
