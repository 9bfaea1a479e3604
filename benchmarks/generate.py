#!/usr/bin/env python3
"""Deterministic generator of CloudTrail-shaped events for benchmarks.

Every record is a real CloudTrail record from data/cloudtrail/stratus-detonation-logs (the
attack detonations and the benign calls around them) with its actor, source IP and time
rewritten: actors are Zipf-distributed over --actors identities, event time advances by
--rate events per second, and attack records (those some per-event detector catches) are
injected at --attack-share of the events. The same arguments always give the same file.

    python3 benchmarks/generate.py --events 1000000 --out /tmp/ct-1m.jsonl
"""
import argparse
import bisect
import datetime
import glob
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
LOGS = os.path.join(HERE, "..", "data", "cloudtrail", "stratus-detonation-logs")
ATTACKS = {
    "StopLogging", "DeleteTrail", "PutEventSelectors", "AttachUserPolicy", "AttachRolePolicy",
    "CreateAccessKey", "UpdateAssumeRolePolicy", "CreateRole", "CreateLoginProfile",
    "UpdateLoginProfile", "ConsoleLogin", "ModifySnapshotAttribute", "ModifyImageAttribute",
    "ModifyDBSnapshotAttribute", "AuthorizeSecurityGroupIngress", "UpdateFunctionCode20150331v2",
    "UpdateFunctionConfiguration20150331v2", "AddPermission20150331v2", "LeaveOrganization",
    "DeleteFlowLogs", "DeleteResolverQueryLogConfig", "CreateTrustAnchor",
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--actors", type=int, default=10_000)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of actor activity")
    p.add_argument("--rate", type=float, default=1000.0, help="events per second of event time")
    p.add_argument("--attack-share", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--round-robin", action="store_true",
                   help="actor = event number modulo --actors (every actor appears; for state-size runs)")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    rng = random.Random(a.seed)
    records = []
    for f in sorted(glob.glob(os.path.join(LOGS, "*.json"))):
        records.extend(json.load(open(f)))
    attacks = [r for r in records if r["eventName"] in ATTACKS]
    benign = [r for r in records if r["eventName"] not in ATTACKS]

    weights = [1.0 / (k ** a.zipf) for k in range(1, a.actors + 1)]
    cumulative, total = [], 0.0
    for w in weights:
        total += w
        cumulative.append(total)

    start = datetime.datetime(2024, 8, 1, tzinfo=datetime.timezone.utc)
    with open(a.out, "w") as out:
        for i in range(a.events):
            template = rng.choice(attacks) if rng.random() < a.attack_share else rng.choice(benign)
            r = dict(template)
            actor = i % a.actors if a.round_robin else bisect.bisect_left(cumulative, rng.random() * total)
            account = "%012d" % (100000000000 + actor % 997)
            name = "user-%d" % actor
            ui = dict(r.get("userIdentity") or {})
            ui.update(type="IAMUser", userName=name, accountId=account,
                      arn="arn:aws:iam::%s:user/%s" % (account, name),
                      principalId="AIDA%016d" % actor)
            r["userIdentity"] = ui
            r["recipientAccountId"] = account
            r["sourceIPAddress"] = "10.%d.%d.%d" % (actor >> 16 & 255, actor >> 8 & 255, actor & 255)
            t = start + datetime.timedelta(seconds=i / a.rate)
            r["eventTime"] = t.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (t.microsecond // 1000)
            r["eventID"] = "%08x-0000-4000-8000-%012x" % (a.seed, i)
            out.write(json.dumps(r, separators=(",", ":")))
            out.write("\n")


if __name__ == "__main__":
    main()
