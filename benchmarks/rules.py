#!/usr/bin/env python3
"""A realistic rule suite for the throughput benchmark: N per-event detectors generated from the
cloudtrail pipeline's shipped ones with varied constants.

The shipped detectors come first, unchanged. Each further detector is a shipped one (in turn)
whose service and API constants (`event_source = '...'`, `action = '...'`, `action LIKE '...'`,
`action IN (...)`) name another API call seen in the input, as a suite written for many APIs
would: the same shapes (JSON fields read from `raw`, conditions, sub-queries), other calls. Only
calls that make up less than 1 % of the input are used (sensitive calls are rare; a rule on a
call that is a third of the traffic would be a different workload), so most batches hold a few
events each detector keeps. Deterministic for a given input.

    python3 benchmarks/rules.py --detectors benchmarks/pipelines/w1/detectors \
        --input EVENTS.jsonl --count 200 --out DIR/detectors
"""

import argparse
import collections
import itertools
import json
import re
from pathlib import Path

SOURCE = re.compile(r"event_source = '[^']*'")
ACTION = re.compile(r"action (=|LIKE) '[^']*'|action IN \([^)]*\)")
ID = re.compile(r"^-- id: (\S+)$", re.M)


def rare_calls(input_path, sample):
    """(eventSource, eventName) pairs under 1 % of the first `sample` records, sorted."""
    counts = collections.Counter()
    total = 0
    with open(input_path) as f:
        for line in f:
            record = json.loads(line)
            counts[(record.get("eventSource"), record.get("eventName"))] += 1
            total += 1
            if total == sample:
                break
    rare = sorted(p for p, c in counts.items() if c < total / 100 and all(p))
    if not rare:
        raise SystemExit(f"{input_path}: no API call under 1 % of its first {total} records")
    return rare


def variant(text, base_id, number, calls):
    """Detector `text` as variant `number`: each service/API constant names the next call."""
    turn = itertools.count(number)

    def call():
        return calls[next(turn) % len(calls)]

    pairs = []

    def action(match):
        source, name = call()
        pairs.append(source)
        if match.group(0).startswith("action LIKE"):
            return f"action LIKE '{name}%'"
        return f"action = '{name}'"

    text = ACTION.sub(action, text)
    sources = iter(pairs)

    def source(_match):
        return f"event_source = '{next(sources, None) or call()[0]}'"

    text = SOURCE.sub(source, text)
    return ID.sub(f"-- id: {base_id}-v{number}", text, count=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", required=True, type=Path, help="the shipped per-event detectors")
    parser.add_argument("--input", required=True, help="the events the suite will read (JSON lines)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    shipped = [(p.name, p.read_text()) for p in sorted(args.detectors.glob("*.sql"))]
    calls = rare_calls(args.input, 100_000)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in shipped[: args.count]:
        (args.out / name).write_text(text)
    for i in range(args.count - len(shipped)):
        _, text = shipped[i % len(shipped)]
        base_id = ID.search(text).group(1)
        number = i + 1
        (args.out / f"{base_id}-v{number}.sql").write_text(variant(text, base_id, number, calls))


if __name__ == "__main__":
    main()
