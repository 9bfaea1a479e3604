#!/usr/bin/env python3
"""Regenerates the Panther cases of the shipped pipelines from the labelled events of
panther-labs/panther-analysis (data/peer-tests/, Apache-2.0):

- pipelines/cloudtrail/tests/panther.toml from panther_cloudtrail_rule_tests.jsonl;
- pipelines/kubernetes/tests/panther.toml from panther_k8s_rule_tests.jsonl.

Each Panther test is one event with `expected_result`: whether that event matches the rule's
per-event condition. Where a Rampart detector covers the same technique, the event becomes a
case scoped to that detector: a match must produce exactly one decision for the event's actor,
a non-match none. Tests whose verdict rests on Panther-only context (mocks, lookups) are left
out, with the reason below; so are events Rampart cannot judge (no time or no actor: they go
to the dead letters, tested elsewhere) and, for Kubernetes, events in another log format than
the API server's audit.k8s.io Event (GKE's Cloud Audit Logs `protoPayload`, AKS's diagnostic
records): the kubernetes pipeline maps the audit.k8s.io shape only.
"""
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def cloudtrail_actor(log):
    ui = log.get("userIdentity") or {}
    return ui.get("arn") or ui.get("principalId") or ui.get("invokedBy")


def cloudtrail_event(log):
    return log if "eventTime" in log else None


def k8s_actor(log):
    return (log.get("user") or {}).get("username")


def k8s_event(log):
    """An audit.k8s.io Event. Panther's tests often leave out apiVersion and the timestamps,
    which no detector here judges: the time is Panther's own p_event_time (the same instant),
    else a fixed one. An event without a verb is left out (Rampart sends it to the dead
    letters: the API server writes one on every event)."""
    if "verb" not in log:
        return None
    event = {k: v for k, v in log.items() if not k.startswith("p_")}
    if "requestReceivedTimestamp" not in event:
        event["requestReceivedTimestamp"] = log.get("p_event_time", "2024-01-01T00:00:00Z")
    return event


SUITES = [
    {
        "source": "data/peer-tests/panther_cloudtrail_rule_tests.jsonl",
        "target": "pipelines/cloudtrail/tests/panther.toml",
        "actor": cloudtrail_actor,
        "event": cloudtrail_event,
        # Panther rule -> (Rampart detector, verdict)
        "rules": {
            "AWS.CloudTrail.Stopped": ("trail-logging-disabled", "block"),
            "AWS.CloudTrail.EventSelectorsDisabled": ("trail-event-selectors-narrowed", "block"),
            "AWS.IAM.AttachAdminUserPolicy": ("iam-admin-policy-attached", "block"),
            "AWS.IAM.AttachAdminRolePolicy": ("iam-admin-policy-attached", "block"),
            "AWS.IAM.Backdoor.User.Keys": ("iam-access-key-for-another-user", "block"),
            "AWS.IAM.BackdoorRole": ("iam-role-trusts-outside-account", "block"),
            "AWS.Console.LoginWithoutMFA": ("console-login-without-mfa", "review"),
            "AWS.CloudTrail.SnapshotMadePublic": ("ebs-snapshot-shared", "block"),
            "AWS.CloudTrail.AMIModifiedForPublicAccess": ("ami-shared", "block"),
            "AWS.CloudTrail.AttemptToLeaveOrg": ("organization-leave-attempt", "block"),
            "AWS.Lambda.UpdateFunctionCode": ("lambda-code-overwritten", "review"),
            "AWS.CloudTrail.LoginProfileCreatedOrModified": ("iam-login-profile-for-another-user", "block"),
        },
        # Panther's "security group modified" fires on any ingress change; Rampart's detector
        # only on SSH opened to the world. None of these events opens SSH to the world.
        "nothing_fires": {"AWS.EC2.SecurityGroupModified": "security-group-ssh-open-to-world"},
        "skip": {
            # Panther suppresses this through a mocked "user created in the last day" lookup.
            ("AWS.Console.LoginWithoutMFA", "No MFA Login - New User"): "depends on a Panther lookup",
        },
    },
    {
        "source": "data/peer-tests/panther_k8s_rule_tests.jsonl",
        "target": "pipelines/kubernetes/tests/panther.toml",
        "actor": k8s_actor,
        "event": k8s_event,
        "rules": {
            "Kubernetes.Pod.Exec": ("pod-exec", "alert"),
            "Kubernetes.Pod.StealServiceAccountToken": ("service-account-token-read", "block"),
            "Kubernetes.Pod.Privileged.Created": ("privileged-pod", "block"),
            "Kubernetes.Pod.HostPath.Volume": ("host-path-pod", "block"),
            "Kubernetes.Pod.Host.Network": ("host-namespace-pod", "block"),
            "Kubernetes.Pod.Host.PID": ("host-namespace-pod", "block"),
            "Kubernetes.Pod.Host.IPC": ("host-namespace-pod", "block"),
            "Kubernetes.ClusterRoleBinding.Privileged": ("cluster-admin-binding", "block"),
            "Kubernetes.API.AnonymousAccess": ("anonymous-api-access", "alert"),
            "Amazon.EKS.AnonymousAPIAccess": ("anonymous-api-access", "alert"),
            "Kubernetes.Secrets.DumpAllNamespaces": ("secrets-listed-cluster-wide", "block"),
        },
        "nothing_fires": {},
        "skip": {},
    },
]


def generate(suite):
    source, target = ROOT / suite["source"], ROOT / suite["target"]
    out = [
        f"# Generated by scripts/make-panther-cases.py from {suite['source']}",
        "# (panther-labs/panther-analysis at daa10c8, Apache-2.0). Do not edit by hand.",
        "",
    ]
    for line in source.read_text().splitlines():
        test = json.loads(line)
        rule, name = test["rule_id"], test["test_name"]
        if (rule, name) in suite["skip"]:
            continue
        if rule in suite["rules"]:
            detector, verdict = suite["rules"][rule]
            fires = test["expected_result"]
        elif rule in suite["nothing_fires"]:
            detector, verdict, fires = suite["nothing_fires"][rule], None, False
        else:
            continue
        log = {k: v for k, v in test["log"].items() if not k.startswith("p_") or suite["event"] is k8s_event}
        event = suite["event"](log)
        if event is None or not suite["actor"](event):
            continue
        out.append("[[case]]")
        out.append(f"name = {json.dumps(f'panther {rule}: {name}')}")
        out.append(f"detectors = [{json.dumps(detector)}]")
        out.append(f"events = '''\n{json.dumps(event, sort_keys=True)}\n'''")
        if fires:
            actor = json.dumps(suite["actor"](event))
            out.append(f"expect = [{{ detector = {json.dumps(detector)}, verdict = {json.dumps(verdict)}, actor = {actor} }}]")
        else:
            out.append("expect = []")
        out.append("")
    target.write_text("\n".join(out))


if __name__ == "__main__":
    for suite in SUITES:
        generate(suite)
