#!/usr/bin/env python3
"""Builds the demo's live feed: the 35 real Stratus Red Team detonations mixed into benign
CloudTrail traffic, ending now.

The benign traffic is the detonation logs' own successful read-only calls (Describe/List/Get,
minus the ones threshold detectors count), re-attributed to --users developer identities at
--rate events per second over --minutes of event time. Each detonation file keeps its own
timing and starts 20 s after the previous one, from minute 2. The whole timeline is moved so
that its last event is now: blocks the attacks cause are active while the demo runs.
--benign-only leaves the detonations out and starts the timeline now instead.

    python3 scripts/demo-feed.py --out /tmp/feed.jsonl
    python3 scripts/demo-feed.py --out /tmp/more.jsonl --benign-only --minutes 2
"""
import argparse
import datetime
import glob
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
LOGS = os.path.join(HERE, "..", "data", "cloudtrail", "stratus-detonation-logs")
# Calls the threshold detectors count: kept out of the benign traffic.
COUNTED = {"GetPasswordData", "GetSecretValue", "BatchGetSecretValue", "DescribeInstanceAttribute", "ConsoleLogin"}


def parse(t):
    return datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))


def fmt(t):
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--rate", type=float, default=20, help="benign events per second of event time")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--benign-only", action="store_true", help="no detonations; the timeline starts now")
    a = p.parse_args()
    rng = random.Random(a.seed)

    files = []
    for f in sorted(glob.glob(os.path.join(LOGS, "*.json"))):
        d = json.load(open(f))
        files.append(sorted(d["Records"] if isinstance(d, dict) else d, key=lambda r: r["eventTime"]))
    benign = [
        r for recs in files for r in recs
        if r["eventName"].startswith(("Describe", "List", "Get"))
        and r["eventName"] not in COUNTED and "errorCode" not in r
    ]

    start = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
    timeline = []
    for i in range(int(a.minutes * 60 * a.rate)):
        r = json.loads(json.dumps(rng.choice(benign)))
        user = f"dev-{int(rng.paretovariate(1.2)) % a.users}"
        r["userIdentity"] = {"type": "IAMUser", "userName": user, "accountId": "111122223333",
                             "arn": f"arn:aws:iam::111122223333:user/{user}",
                             "principalId": f"AIDADEV{user[4:]:0>9}"}
        r["recipientAccountId"] = "111122223333"
        r["sourceIPAddress"] = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(256)}"
        timeline.append((start + datetime.timedelta(seconds=i / a.rate), r))
    for k, recs in enumerate([] if a.benign_only else files):
        first = parse(recs[0]["eventTime"])
        at = start + datetime.timedelta(minutes=2, seconds=20 * k)
        for r in recs:
            timeline.append((at + (parse(r["eventTime"]) - first), r))
    timeline.sort(key=lambda x: x[0])
    now = datetime.datetime.now(datetime.timezone.utc)
    shift = now - (timeline[0][0] if a.benign_only else timeline[-1][0])
    with open(a.out, "w") as out:
        for t, r in timeline:
            r["eventTime"] = fmt(t + shift)
            out.write(json.dumps(r, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
