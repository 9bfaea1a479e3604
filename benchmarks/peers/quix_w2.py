#!/usr/bin/env python3
"""Workload W2 in Quix Streams (the closest peer: librdkafka + RocksDB windows, in Python).

The same 8 detectors as benchmarks/pipelines/w2, over the same topic of CloudTrail-shaped JSON
records: 3 per-event rules and 5 sliding windows (API calls per actor over 1 minute, failed
calls per actor over 15 minutes, distinct APIs per source IP over 10 minutes, denied
reconnaissance per actor over 10 minutes, distinct secrets per actor over 1 hour). Windows are
keyed by message key, so each is a `group_by` (a repartition topic) as Quix requires. Every
match is published to the decisions topic as {"detector", "actor", "event_time"}.

Stops after --events input messages and prints one JSON line: events, seconds, events/s.

    python3 benchmarks/peers/quix_w2.py --brokers 127.0.0.1:9092 --input bench.events \
        --decisions quix.decisions --events 200000
"""
import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timedelta

from quixstreams import Application
from quixstreams.models.topics import manager as topic_manager

# Tansu (the local broker) does not report topic configs; Quix needs `retention.ms` to derive
# its repartition topics' config. Treat a missing value as Kafka's "no limit".
_derive = topic_manager.TopicManager.derive_topic_config


def _derive_with_defaults(cls, topics):
    topics = list(topics)
    for t in topics:
        if t.broker_config is not None:
            t.broker_config.extra_config.setdefault("retention.ms", "-1")
    return _derive(topics)


topic_manager.TopicManager.derive_topic_config = classmethod(_derive_with_defaults)

RECON_ERRORS = {"AccessDenied", "Client.UnauthorizedOperation", "UnauthorizedOperation"}


def actor(r):
    ui = r.get("userIdentity") or {}
    return ui.get("arn") or ui.get("principalId") or ui.get("invokedBy") or ""


def outcome(r):
    return (r.get("responseElements") or {}).get("ConsoleLogin") or r.get("errorCode") or "Success"


def millis(r):
    return int(datetime.fromisoformat(r["eventTime"].replace("Z", "+00:00")).timestamp() * 1000)


def params(r):
    return r.get("requestParameters") or {}


def admin_policy(r):
    return (r.get("eventSource") == "iam.amazonaws.com"
            and r.get("eventName") in ("AttachUserPolicy", "AttachRolePolicy", "AttachGroupPolicy")
            and r.get("errorCode") is None
            and params(r).get("policyArn") == "arn:aws:iam::aws:policy/AdministratorAccess")


def trail_disabled(r):
    return (r.get("eventSource") == "cloudtrail.amazonaws.com"
            and r.get("eventName") in ("StopLogging", "DeleteTrail") and r.get("errorCode") is None)


def ssh_open(r):
    if r.get("eventSource") != "ec2.amazonaws.com" or r.get("eventName") != "AuthorizeSecurityGroupIngress" \
            or r.get("errorCode") is not None:
        return False
    p = params(r)
    try:
        perm = p["ipPermissions"]["items"][0]
    except (KeyError, IndexError, TypeError):
        perm = {}
    cidr = p.get("cidrIp")
    if cidr is None:
        try:
            cidr = perm["ipRanges"]["items"][0]["cidrIp"]
        except (KeyError, IndexError, TypeError):
            cidr = None
    lo = p.get("fromPort", perm.get("fromPort"))
    hi = p.get("toPort", perm.get("toPort"))
    return bool(cidr and cidr.endswith("/0") and lo is not None and hi is not None and lo <= 22 <= hi)


def main():
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--brokers", required=True)
    a.add_argument("--input", required=True)
    a.add_argument("--decisions", required=True)
    a.add_argument("--events", type=int, required=True)
    a.add_argument("--group", default="quix-w2")
    a.add_argument("--windows", default="all",
                   help="comma-separated window detectors to run (default all; `none`: per-event rules only)")
    args = a.parse_args()

    state_dir = tempfile.mkdtemp(prefix="quix-state-")
    app = Application(
        broker_address=args.brokers,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        use_changelog_topics=False,
        loglevel="WARNING",
        # The same client settings as Rampart's benchmarks on this broker (Tansu answers a
        # fetch only when fetch.wait.max.ms has passed).
        consumer_extra_config={"fetch.wait.max.ms": 25},
        producer_extra_config={"linger.ms": 10},
    )
    src = app.topic(args.input, value_deserializer="json",
                    timestamp_extractor=lambda value, headers, ts, ts_type: millis(value))
    out = app.topic(args.decisions, value_serializer="json")
    sdf = app.dataframe(src)

    seen = {"n": 0, "start": None}

    def count(_value):
        if seen["start"] is None:
            seen["start"] = time.monotonic()
        seen["n"] += 1
        if seen["n"] >= args.events:
            seen["end"] = time.monotonic()
            app.stop()

    sdf = sdf.update(count)

    def emit(detector, key_of):
        return lambda v: {"detector": detector, "actor": key_of(v), "event_time": v["eventTime"]}

    for detector, rule in (("iam-admin-policy-attached", admin_policy),
                           ("trail-logging-disabled", trail_disabled),
                           ("security-group-ssh-open-to-world", ssh_open)):
        sdf.filter(rule).apply(emit(detector, actor)).to_topic(out)

    def window(detector, source, key, duration, value, reduce=None, init=None, size=len, threshold=None):
        if args.windows != "all" and detector not in args.windows.split(","):
            return
        keyed = source.group_by(key, name=detector)
        w = keyed.apply(value).sliding_window(duration)
        agg = w.reduce(reduce, init) if reduce else w.count()
        stream = agg.current()
        result = stream.apply(lambda r: size(r["value"]) if reduce and size else r["value"])
        result = result.filter(threshold)
        result.apply(
            lambda n, key, ts, headers, detector=detector: {
                "detector": detector, "key": key.decode() if isinstance(key, bytes) else key,
                "value": n, "event_time_ms": ts},
            metadata=True,
        ).to_topic(out)

    window("api-rate-per-actor", sdf, actor, timedelta(minutes=1), lambda v: 1, threshold=lambda n: n > 12000)
    window("failure-volume-per-actor", sdf, actor, timedelta(minutes=15),
           lambda v: 0 if outcome(v) == "Success" else 1,
           reduce=lambda agg, x: agg + x, init=lambda x: x, size=None, threshold=lambda n: n >= 50000)
    window("actions-per-origin", sdf, lambda v: v.get("sourceIPAddress") or "", timedelta(minutes=10),
           lambda v: v.get("eventName"),
           reduce=lambda agg, x: {**agg, x: 1} if x not in agg else agg, init=lambda x: {x: 1},
           threshold=lambda n: n >= 200)
    recon = sdf.filter(lambda v: v.get("errorCode") in RECON_ERRORS
                       and str(v.get("eventName", "")).startswith(("List", "Describe", "Get")))
    window("recon-denied-calls", recon, actor, timedelta(minutes=10), lambda v: 1, threshold=lambda n: n >= 15)
    secrets = sdf.filter(lambda v: v.get("eventSource") == "secretsmanager.amazonaws.com"
                         and v.get("eventName") == "GetSecretValue" and v.get("errorCode") is None)
    window("secrets-mass-read", secrets, actor, timedelta(hours=1), lambda v: params(v).get("secretId"),
           reduce=lambda agg, x: {**agg, x: 1} if x not in agg else agg, init=lambda x: {x: 1},
           threshold=lambda n: n >= 20)

    app.run()
    seconds = seen.get("end", time.monotonic()) - (seen["start"] or time.monotonic())
    print(json.dumps({"system": "quixstreams", "events": seen["n"], "seconds": round(seconds, 3),
                      "events_per_second": round(seen["n"] / max(seconds, 1e-9))}))


if __name__ == "__main__":
    sys.exit(main())
