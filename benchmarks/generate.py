#!/usr/bin/env python3
"""Deterministic generator of CloudTrail-shaped events for benchmarks.

Every record is a real CloudTrail record from data/cloudtrail/stratus-detonation-logs (the
attack detonations and the benign calls around them) with its actor, source IP and time
rewritten: actors are Zipf-distributed over --actors identities, event time advances by
--rate events per second, and attack records (those some per-event detector catches) are
injected at --attack-share of the events. The same arguments always give the same file.

With --bursts N, N abusive bursts are injected at evenly spaced known times, each by a new
actor (user "burst-K"), alternating two kinds that W2's selective windows look for:
reconnaissance (20 denied Describe/Get calls within 20 ms: recon-denied-calls, at least 15 in
10 minutes) and secrets (25 distinct secrets read: secrets-mass-read, at least 20 in an hour).
--truth FILE writes what was injected, one JSON line per burst (detector, key, kind, time), for
scoring every system's decisions for precision and recall (benchmarks/score.py).

    python3 benchmarks/generate.py --events 1000000 --out /tmp/ct-1m.jsonl
    python3 benchmarks/generate.py --events 200000 --bursts 40 --truth /tmp/truth.jsonl --out /tmp/ct.jsonl
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
    p.add_argument("--bursts", type=int, default=0, help="abusive bursts to inject (see above)")
    p.add_argument("--truth", help="where to write the injected bursts (JSON lines)")
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

    denied = [r for r in records if r.get("errorCode") in ("AccessDenied", "Client.UnauthorizedOperation")
              and r["eventName"].startswith(("List", "Describe", "Get"))]
    secrets = [r for r in records if r["eventName"] == "GetSecretValue" and not r.get("errorCode")]
    # Burst k starts at event (k + 1/2) * events / bursts; its records replace the ones there.
    burst_at = {int((k + 0.5) * a.events / a.bursts): k for k in range(a.bursts)} if a.bursts else {}
    queued = []  # (template, burst number) still to emit
    truth = []

    start = datetime.datetime(2024, 8, 1, tzinfo=datetime.timezone.utc)
    with open(a.out, "w") as out:
        for i in range(a.events):
            if i in burst_at:
                k = burst_at[i]
                if k % 2 == 0:
                    kind, detector = "recon", "recon-denied-calls"
                    queued += [(dict(denied[j % len(denied)]), k) for j in range(20)]
                else:
                    kind, detector = "secrets", "secrets-mass-read"
                    for j in range(25):
                        r = dict(secrets[j % len(secrets)])
                        r["requestParameters"] = {"secretId": "arn:aws:secretsmanager:us-east-1:%012d:secret:burst-%d-%d"
                                                  % (100000000000 + k % 997, k, j)}
                        queued.append((r, k))
                truth.append({"detector": detector, "kind": kind, "burst": k, "first_event": i})
            burst = None
            if queued:
                template, burst = queued.pop(0)
                r = template
                actor = a.actors + burst
                name = "burst-%d" % burst
            else:
                template = rng.choice(attacks) if rng.random() < a.attack_share else rng.choice(benign)
                r = dict(template)
                actor = i % a.actors if a.round_robin else bisect.bisect_left(cumulative, rng.random() * total)
                name = "user-%d" % actor
            account = "%012d" % (100000000000 + actor % 997)
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
            if burst is not None and "key" not in truth[burst]:
                truth[burst].update(key=ui["arn"], time=r["eventTime"])
    if a.truth:
        with open(a.truth, "w") as f:
            for t in truth:
                f.write(json.dumps(t) + "\n")


if __name__ == "__main__":
    main()
