#!/usr/bin/env python3
"""Scores systems' decisions: which (detector, key) pairs each found, where they differ, and
precision and recall against the bursts benchmarks/generate.py injected (--truth).

    python3 benchmarks/score.py --truth truth.jsonl rampart=decisions.jsonl quix=quix.jsonl

Each decisions file is JSON lines: Rampart's decisions ({"detector": {"id": ...}, "key": ...};
revocations and fail-safe shadow copies are left out) or a peer's matches ({"detector": ...,
"key": ...}). Prints two Markdown tables: detections per detector side by side (the first
system against each other one), and for each detector that bursts target, per system: bursts
injected, bursts found (recall) and the share of the keys it alerted on that are injected
bursts (precision against the injected truth; background traffic that crosses a threshold
counts against it, the same way for every system).
"""
import argparse
import collections
import json


def pairs(path):
    """{detector: set of keys} of a decisions file."""
    out = collections.defaultdict(set)
    for line in open(path):
        d = json.loads(line)
        detector = d["detector"]
        if isinstance(detector, dict):  # Rampart
            if d["verdict"] == "revoke" or "fail-safe" in d.get("tags", []):
                continue
            detector = detector["id"]
        out[detector].add(d.get("key") or d.get("actor"))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", help="the bursts generate.py injected (JSON lines)")
    p.add_argument("systems", nargs="+", help="NAME=DECISIONS.jsonl")
    a = p.parse_args()
    systems = [(s.split("=", 1)[0], pairs(s.split("=", 1)[1])) for s in a.systems]

    first_name, first = systems[0]
    for name, other in systems[1:]:
        print(f"| detector | keys found by {first_name} | by {name} | in both | only {first_name} | only {name} |")
        print("| --- | --- | --- | --- | --- | --- |")
        for det in sorted(set(first) | set(other)):
            x, y = first.get(det, set()), other.get(det, set())
            print(f"| {det} | {len(x)} | {len(y)} | {len(x & y)} | {len(x - y)} | {len(y - x)} |")
        print()

    if not a.truth:
        return
    truth = collections.defaultdict(set)
    for line in open(a.truth):
        t = json.loads(line)
        truth[t["detector"]].add(t["key"])
    print("| detector | system | bursts injected | found | recall | keys alerted | of them injected | precision |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for det in sorted(truth):
        injected = truth[det]
        for name, found in systems:
            alerted = found.get(det, set())
            hits = len(alerted & injected)
            recall = hits / len(injected)
            precision = f"{hits / len(alerted):.2f}" if alerted else "-"
            print(f"| {det} | {name} | {len(injected)} | {hits} | {recall:.2f} | {len(alerted)} | {hits} | {precision} |")


if __name__ == "__main__":
    main()
