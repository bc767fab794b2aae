"""Prints the live-vs-simulated table of scripts/live-vs-sim.sh from its outputs.

Usage: side_by_side.py [--tasks A,B…] OUT_DIR POLICIES SEED… (POLICIES comma-separated).
Live figures come from OUT_DIR/live-POLICY.json (`tidalctl load --summary-json`), simulated
ones from OUT_DIR/sim-SEED.csv (`tidalctl simulate --csv`), one row per seed shown as a range.
With --tasks (scripts/live-vs-sim-tasks.sh), one row pair per policy and task: live from
OUT_DIR/live-POLICY-TASK.json, simulated from the task's rows of `simulate --tasks --csv`, and
the gap in points of violations and accuracy between live and the simulated seeds' median.
"""
import csv
import json
import sys
from pathlib import Path


def span(values, fmt):
    lo, hi = min(values), max(values)
    return fmt.format(lo) if abs(hi - lo) < 1e-9 else (fmt.format(lo) + "–" + fmt.format(hi))


def median(values):
    v = sorted(values)
    return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2


def tasks_table(tasks, out, policies, seeds):
    sims = {}
    for seed in seeds:
        with open(out / f"sim-{seed}.csv") as f:
            for row in csv.DictReader(f):
                sims.setdefault((row["policy"], row["task"]), []).append(row)
    print("| policy | task | run | SLO violations | p99 | accuracy | mean cores | gap (points) |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in policies:
        for task in tasks:
            live = json.loads((out / f"live-{policy}-{task}.json").read_text())
            rows = sims.get((policy, task), [])
            gap = ""
            if rows:
                viol = median([float(r["violation_pct"]) for r in rows])
                acc = median([float(r["accuracy"]) for r in rows])
                gap = f"{live['slo_violation_pct'] - viol:+.2f} viol, {live['mean_accuracy'] - acc:+.2f} acc"
            print(
                f"| {policy} | {task} | live | {live['slo_violation_pct']:.2f} % | {live['p99_ms']:.0f} ms | "
                f"{live['mean_accuracy']:.2f} % | {live['mean_cores'] or 0:.2f} | {gap} |"
            )
            if rows:
                p99 = [float(r["p99_ms"]) for r in rows]
                p99_text = "dropped" if any(p == float("inf") for p in p99) else span(p99, "{:.0f}") + " ms"
                print(
                    f"| {policy} | {task} | simulated | "
                    f"{span([float(r['violation_pct']) for r in rows], '{:.2f}')} % | {p99_text} | "
                    f"{span([float(r['accuracy']) for r in rows], '{:.2f}')} % | "
                    f"{span([float(r['mean_cores']) for r in rows], '{:.2f}')} | |"
                )


def main():
    args = sys.argv[1:]
    if args and args[0] == "--tasks":
        tasks_table(args[1].split(","), Path(args[2]), args[3].split(","), args[4:])
        return
    out, policies, seeds = Path(args[0]), args[1].split(","), args[2:]
    sims = {}
    for seed in seeds:
        with open(out / f"sim-{seed}.csv") as f:
            for row in csv.DictReader(f):
                sims.setdefault(row["policy"], []).append(row)
    print("| policy | run | SLO violations | p99 | accuracy | mean cores | plans |")
    print("|---|---|---|---|---|---|---|")
    for policy in policies:
        live_path = out / f"live-{policy}.json"
        if live_path.exists():
            live = json.loads(live_path.read_text())
            print(
                f"| {policy} | live | {live['slo_violation_pct']:.2f} % | {live['p99_ms']:.0f} ms | "
                f"{live['mean_accuracy']:.2f} % | {live['mean_cores'] or 0:.2f} | {live['plans'] or 0} |"
            )
        rows = sims.get(policy, [])
        if rows:
            p99 = [float(r["p99_ms"]) for r in rows]
            p99_text = "dropped" if any(p == float("inf") for p in p99) else span(p99, "{:.0f}") + " ms"
            print(
                f"| {policy} | simulated | {span([float(r['violation_pct']) for r in rows], '{:.2f}')} % | "
                f"{p99_text} | {span([float(r['accuracy']) for r in rows], '{:.2f}')} % | "
                f"{span([float(r['mean_cores']) for r in rows], '{:.2f}')} | "
                f"{span([int(r['reconfigurations']) for r in rows], '{}')} |"
            )


if __name__ == "__main__":
    main()
