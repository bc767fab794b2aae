"""Helpers of scripts/ipa-pipelines.sh (IPA's comparison on its pipelines, measured here).

  ipa_pipelines.py scale PROFILES TRACE START DURATION CORES LOAD
      The trace factor that makes the slice's peak LOAD (a fraction) of what CORES cores carry
      with every stage at its lightest variant unbatched (its most requests per second on one
      core at batch 1, a stage that writes text at the most tokens it was profiled writing):
      a load every policy can carry within the SLO without batching.
  ipa_pipelines.py samples PIPELINE DIR [N]
      N sample requests (V2 bodies) of deploy/PIPELINE.toml's inputs: texts of words from
      /usr/share/dict/words, two seconds of synthetic 16 kHz audio; seeded.
  ipa_pipelines.py reuse TASK_FILE OUT DEST
      Where every variant of TASK_FILE was profiled already for another pipeline (the same
      model generated alike, in OUT/*/profiles.json), writes its profiles to DEST under this
      file's stages and exits 0; else exits 1.
  ipa_pipelines.py table OUT PIPELINE…
      The markdown table of each pipeline's simulated day (OUT/PIPELINE/sim*.csv; a policy's
      OUT/PIPELINE/unfinished-POLICY.txt says why it has no row) and, where it
      was run, its live slice against the slice simulated (OUT/PIPELINE/live-POLICY.json,
      OUT/PIPELINE/slice-sim.csv).
"""
import csv
import gzip
import json
import math
import random
import sys
from pathlib import Path


def read_trace(path, start, duration):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        rates = [float(line) for line in f if line.strip()]
    return rates[start:start + duration]


def scale(profiles, trace, start, duration, cores, load):
    saved = json.loads(Path(profiles).read_text())
    best = {}
    order = []
    for v in saved["variants"]:
        points = [p for p in v["points"] if p.get("cores") == 1 and p.get("batch") == 1]
        most = max((p.get("output_tokens", 0) for p in points), default=0)
        points = [p for p in points if p.get("output_tokens", 0) == most]
        # A stage that classifies several crops of each request carries that many fewer requests.
        rate = max((p["throughput_rps"] for p in points), default=0.0) / max(1, v.get("crops") or 1)
        stage = v["stage"]
        if stage not in best:
            order.append(stage)
        best[stage] = max(best.get(stage, 0.0), rate)
    per_core = 1.0 / sum(1.0 / best[s] for s in order)
    peak = max(read_trace(trace, start, duration))
    factor = load * cores * per_core / peak
    print(f"{factor:.6g}")
    print(
        f"lightest variants carry {per_core:.3f} requests/s per core ({', '.join(f'{s} {best[s]:.2f}/s' for s in order)}); "
        f"the slice's peak of {peak:.0f}/s becomes {peak * factor:.2f}/s, {load:.0%} of {cores} cores",
        file=sys.stderr,
    )


# The inputs each pipeline's requests give.
INPUTS = {
    "audio-qa": ["input_values", "question"],
    "audio-sentiment": ["input_values"],
    "sum-qa": ["text", "question"],
    "nlp": ["text"],
}


def samples(pipeline, out, n):
    rng = random.Random(25)
    words = [w.strip() for w in open("/usr/share/dict/words", encoding="utf-8") if w.strip().isalpha()]
    words = [w.lower() for w in words if w.isascii()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        inputs = []
        for name in INPUTS[pipeline]:
            if name == "input_values":
                f0 = rng.uniform(100, 250)
                audio = [
                    round(0.3 * math.sin(2 * math.pi * f0 * t / 16000) * (0.5 + 0.5 * math.sin(2 * math.pi * 3 * t / 16000))
                          + rng.gauss(0, 0.02), 5)
                    for t in range(32000)
                ]
                inputs.append({"name": name, "shape": [1, len(audio)], "datatype": "FP32", "data": audio})
            else:
                length = 6 if name == "question" else 48
                text = " ".join(rng.choice(words) for _ in range(length))
                inputs.append({"name": name, "shape": [1, 1], "datatype": "BYTES", "data": [text]})
        (out / f"{i:03}.json").write_text(json.dumps({"inputs": inputs}))


def reuse(task_file, out, dest):
    import tomllib
    task = tomllib.loads(Path(task_file).read_text())
    measured = {}
    for saved in sorted(Path(out).glob("*/profiles.json")):
        for v in json.loads(saved.read_text())["variants"]:
            measured.setdefault(v["name"], v)
    variants = []
    for stage in task["stages"]:
        for name in stage["variants"]:
            if name not in measured:
                return 1
            variants.append(dict(measured[name], stage=stage["name"] if len(task["stages"]) > 1 else ""))
    Path(dest).write_text(json.dumps({"task": task["name"], "variants": variants}, indent=2))
    print(f"{task_file}: every variant profiled already; reusing those profiles", file=sys.stderr)
    return 0


def rows(path):
    with open(path) as f:
        return {r["policy"]: r for r in csv.DictReader(f)}


def table(out, pipelines):
    out = Path(out)
    for pipeline in pipelines:
        d = out / pipeline
        meta = json.loads((d / "meta.json").read_text())
        print(f"### {pipeline}\n")
        print(
            f"A day of the trace (seconds {meta['start']}–{meta['start'] + meta['duration']}) × {meta['scale']:.4g}, "
            f"SLO {meta['slo_ms']} ms, {meta['cores']} cores, simulated with the profiles measured here.\n"
        )
        print("| policy | SLO violations | p99 | accuracy (mean of stages) | IPA's normalised sum | product | mean cores |")
        print("|---|---|---|---|---|---|---|")
        found = {}
        for path in sorted(d.glob("sim*.csv")):
            found.update(rows(path))
        for policy, r in found.items():
            p99 = float(r["p99_ms"])
            p99 = "dropped" if math.isinf(p99) else f"{p99:.0f} ms"
            print(
                f"| {policy} | {float(r['violation_pct']):.2f} % | {p99} | {float(r['accuracy']):.2f} % | "
                f"{float(r['accuracy_normalised']):.3f} | {float(r['accuracy_product']):.2f} % | {float(r['mean_cores']):.2f} |"
            )
        for note in sorted(d.glob("unfinished-*.txt")):
            print(f"| {note.stem.removeprefix('unfinished-')} | {note.read_text().strip()} ||||||")
        print()
        live = d / "live" / "table.md"
        skipped = d / "live" / "skipped.txt"
        if skipped.exists():
            print(f"Live: {skipped.read_text().strip()}.\n")
        elif live.exists():
            print(f"Live on this machine (2 cores), a compressed slice, against the slice simulated (seeds 1-3):\n")
            print(live.read_text())


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "scale":
        scale(args[0], args[1], int(args[2]), int(args[3]), int(args[4]), float(args[5]))
    elif cmd == "samples":
        samples(args[0], args[1], int(args[2]) if len(args) > 2 else 8)
    elif cmd == "reuse":
        sys.exit(reuse(args[0], args[1], args[2]))
    elif cmd == "table":
        table(args[0], args[1:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
