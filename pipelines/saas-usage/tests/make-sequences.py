#!/usr/bin/env python3
"""Writes tests/sequences.toml: the saas-usage pipeline's sequence detectors at their edges."""
import json
from datetime import datetime, timedelta, timezone

T0 = datetime(2026, 11, 2, 10, 0, 0, tzinfo=timezone.utc)
def ev(at, key, tenant, method, route, status, ip="203.0.113.10"):
    t = T0 + at
    ts = t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    return json.dumps({"timestamp": ts, "request_id": f"req-{key}-{int(at.total_seconds()*1000)}", "api_key": key,
                       "tenant": tenant, "method": method, "route": route, "status": status,
                       "client_ip": ip, "latency_ms": 20, "bytes_out": 512}, separators=(",", ":"))
s = lambda x: timedelta(seconds=x)
cases = []
def case(name, detectors, lines, expect):
    cases.append((name, detectors, lines, expect))

D = ["export-after-downgrade"]
down = lambda at, status=200, tenant="initech", key="key_initech_admin": ev(at, key, tenant, "POST", "/v1/billing/downgrade", status)
export = lambda at, key="key_initech_3", tenant="initech", method="POST": ev(at, key, tenant, method, "/v1/exports", 202)
rev = lambda key="key_initech_3", count=1: {"detector": "export-after-downgrade", "verdict": "review", "actor": key, **({"count": count} if count != 1 else {})}
case("a bulk export 20 minutes after the plan's downgrade, by another key of the tenant, is held for review", D,
     [down(s(0)), export(s(1200))], [rev()])
case("exactly 1 hour after is held (the frame includes its start)", D, [down(s(0)), export(s(3600))], [rev()])
case("1 hour and 1 second after is not", D, [down(s(0)), export(s(3601))], [])
case("in the same second as the downgrade is held (peers are in the frame)", D, [down(s(0)), export(s(0))], [rev()])
case("an export before the downgrade is not", D, [export(s(0)), down(s(1))], [])
case("after a refused downgrade is not", D, [down(s(0), status=403), export(s(60))], [])
case("another tenant's downgrade does not count", D, [down(s(0), tenant="hooli", key="key_hooli_admin"), export(s(60))], [])
case("listing exports (GET) after a downgrade is not", D, [down(s(0)), export(s(60), method="GET")], [])
case("every export within the hour is held, by any key", D,
     [down(s(0)), export(s(60)), export(s(120), key="key_initech_4"), export(s(4000))], [rev(), rev("key_initech_4")])

D = ["unverified-trial-burst"]
signup = lambda at, status=201: ev(at, "key_trial_newco", "newco", "POST", "/v1/signup", status)
verify = lambda at: ev(at, "key_trial_newco", "newco", "POST", "/v1/verify", 200)
def burst(start, n, key="key_trial_newco", tenant="newco"):
    return [ev(start + timedelta(milliseconds=900 * i), key, tenant, "GET", "/v1/search", 200) for i in range(n)]
blk = lambda count=1: {"detector": "unverified-trial-burst", "verdict": "block", "actor": "key_trial_newco", **({"count": count} if count != 1 else {})}
case("31 requests within a minute after a trial sign-up, unverified, block from the 31st", D,
     [signup(s(0))] + burst(s(300), 31), [blk()])
case("35 requests: the 31st to the 35th are over the limit", D, [signup(s(0))] + burst(s(300), 35), [blk(5)])
case("30 requests within a minute do not", D, [signup(s(0))] + burst(s(300), 30), [])
case("after the verification they do not", D, [signup(s(0)), verify(s(120))] + burst(s(300), 40), [])
case("a verification in the burst's own second lifts the rows of that second on (its peers)", D,
     [signup(s(0))] + burst(s(300), 31) + [verify(s(300) + timedelta(milliseconds=900 * 30))], [])
case("a burst whose 31st request is exactly 1 day after the sign-up blocks (the frame includes its start)", D,
     [signup(s(0))] + burst(s(86400 - 27), 31), [blk()])
case("1 day and 1 second after the sign-up the burst is not the trial's", D,
     [signup(s(0))] + burst(s(86401 - 27), 31), [])
case("after a refused sign-up nothing is blocked", D, [signup(s(0), status=409)] + burst(s(300), 40), [])
case("a burst by a tenant that never signed up is the plan limits' business, not this detector's", D,
     burst(s(300), 40, key="key_initech_3", tenant="initech"), [])

out = ["# Sequences of the saas-usage pipeline at their edges: a bulk export after a plan downgrade",
       "# (B after A within 1 hour, by tenant), and a trial's burst before its verification (more than",
       "# 30 requests a minute after a sign-up without a verification since), in the gateway's log",
       "# shape (tests/data/*.jsonl). Made by make-sequences.py (python3 make-sequences.py >",
       "# sequences.toml); times are exact to the millisecond.", ""]
def toml_expect(e):
    return "{ " + ", ".join(f'{k} = {json.dumps(v)}' for k, v in e.items()) + " }"
for name, dets, lines, expect in cases:
    out.append("[[case]]")
    out.append(f"name = {json.dumps(name)}")
    out.append(f"detectors = {json.dumps(dets)}")
    lines = sorted(lines, key=lambda l: json.loads(l)["timestamp"])
    out.append("events = '''")
    out.extend(lines)
    out.append("'''")
    out.append("expect = [" + ", ".join(toml_expect(e) for e in expect) + "]")
    out.append("")
print("\n".join(out))
