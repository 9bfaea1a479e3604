#!/usr/bin/env python3
"""Writes absences.toml: the cloudtrail pipeline's absence detectors at their edges."""
import json
import os

admin = {"type": "IAMUser", "arn": "arn:aws:iam::111122223333:user/ops-admin",
         "userName": "ops-admin", "accountId": "111122223333"}
ARN = admin["arn"]
CT, IAM = "cloudtrail.amazonaws.com", "iam.amazonaws.com"


def ev(t, source, name, params=None, error=None):
    e = {"eventTime": f"2024-09-02T{t}Z", "eventSource": source, "eventName": name,
         "userIdentity": admin, "recipientAccountId": "111122223333",
         "sourceIPAddress": "198.51.100.20", "readOnly": False}
    if params is not None:
        e["requestParameters"] = params
    if error:
        e["errorCode"] = error
    return json.dumps(e)


cases = []


def case(name, detector, events, fires, restart_after=None):
    cases.append((name, detector, events, fires, restart_after))


D1 = "trail-logging-not-restarted"
trail = {"name": "org-trail"}
case("a trail stopped and never started again alerts", D1,
     [ev("10:00:00", CT, "StopLogging", trail)], 1)
case("started again exactly 15 minutes later does not (the frame includes its end)", D1,
     [ev("10:00:00", CT, "StopLogging", trail), ev("10:15:00", CT, "StartLogging", trail)], 0)
case("started again 15 minutes and 1 second later alerts", D1,
     [ev("10:00:00", CT, "StopLogging", trail), ev("10:15:01", CT, "StartLogging", trail)], 1)
case("started again in the same second does not", D1,
     [ev("10:00:00", CT, "StopLogging", trail), ev("10:00:00", CT, "StartLogging", trail)], 0)
case("another trail started does not count", D1,
     [ev("10:00:00", CT, "StopLogging", trail),
      ev("10:05:00", CT, "StartLogging", {"name": "other-trail"})], 1)
case("a denied StartLogging does not count", D1,
     [ev("10:00:00", CT, "StopLogging", trail),
      ev("10:05:00", CT, "StartLogging", trail, "AccessDenied")], 1)
case("a denied StopLogging is no stop", D1,
     [ev("10:00:00", CT, "StopLogging", trail, "AccessDenied")], 0)
case("across a restart, started again after it: nothing", D1,
     [ev("10:00:00", CT, "StopLogging", trail), ev("10:10:00", CT, "StartLogging", trail)], 0, 1)
case("across a restart, the pending absence survives it and alerts once the watermark passes", D1,
     [ev("10:00:00", CT, "StopLogging", trail), ev("10:20:00", CT, "DescribeTrails"),
      ev("10:40:00", CT, "DescribeTrails")], 1, 1)

D2 = "iam-user-without-mfa"
eve = {"userName": "eve"}
mfa = dict(eve, serialNumber="arn:aws:iam::111122223333:mfa/eve")
case("a user created with no MFA device alerts", D2, [ev("10:00:00", IAM, "CreateUser", eve)], 1)
case("an MFA device enabled exactly an hour later does not", D2,
     [ev("10:00:00", IAM, "CreateUser", eve), ev("11:00:00", IAM, "EnableMFADevice", mfa)], 0)
case("an hour and 1 second later alerts", D2,
     [ev("10:00:00", IAM, "CreateUser", eve), ev("11:00:01", IAM, "EnableMFADevice", mfa)], 1)
case("in the same second does not", D2,
     [ev("10:00:00", IAM, "CreateUser", eve), ev("10:00:00", IAM, "EnableMFADevice", mfa)], 0)
case("another user's MFA device does not count", D2,
     [ev("10:00:00", IAM, "CreateUser", eve),
      ev("10:10:00", IAM, "EnableMFADevice", {"userName": "frank"})], 1)
case("a failed CreateUser is no user", D2,
     [ev("10:00:00", IAM, "CreateUser", eve, "EntityAlreadyExists")], 0)
case("across a restart, MFA enabled after it: nothing", D2,
     [ev("10:00:00", IAM, "CreateUser", eve), ev("10:30:00", IAM, "EnableMFADevice", mfa)], 0, 1)
case("across a restart, no MFA: alerts", D2,
     [ev("10:00:00", IAM, "CreateUser", eve), ev("10:30:00", IAM, "ListUsers"),
      ev("11:30:00", IAM, "ListUsers")], 1, 1)

out = [
    '# Absences ("A not followed by B within T") of the cloudtrail pipeline at their edges: B',
    "# exactly T after A, one second more, in the same second, another trail or user, a denied",
    "# call, and across a restart (the pending absence is checkpointed and read back). Written",
    "# by make-absences.py.",
    "",
]
for name, detector, events, fires, restart_after in cases:
    out += ["[[case]]", f"name = {json.dumps(name)}", f'detectors = ["{detector}"]']
    if restart_after is not None:
        out.append(f"restart_after = {restart_after}")
    out += ["events = '''", *events, "'''"]
    expect = f'[{{ detector = "{detector}", verdict = "alert", actor = "{ARN}" }}]' if fires else "[]"
    out += [f"expect = {expect}", ""]
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "absences.toml"), "w") as f:
    f.write("\n".join(out))
