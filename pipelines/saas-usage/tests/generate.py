#!/usr/bin/env python3
"""Writes the saas-usage test inputs (deterministic; run again after changing it).

API-gateway access log records, one JSON object per line:
  normal.jsonl       5 minutes of traffic from 120 API keys of five tenants, all under
                     their plans' limits, with a few POST /v1/exports by entitled tenants.
  globex-burst.jsonl key_globex_1 (free plan: soft 40, hard 60 per minute) makes 70
                     requests in 35 seconds; the internal load-test key makes 200 (allow-listed).
  exports.jsonl      hooli (free) and acme (business) each POST /v1/exports once.
"""
import json
import random
from datetime import datetime, timedelta, timezone

START = datetime(2026, 11, 2, 9, 0, 0, tzinfo=timezone.utc)
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]
ROUTES = ["/v1/search", "/v1/items", "/v1/items/{id}", "/v1/users/me", "/v1/reports"]


def record(t, key, tenant, route, method="GET", status=200, n=0):
    return {
        "timestamp": t.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": f"req-{key}-{n}",
        "api_key": key,
        "tenant": tenant,
        "method": method,
        "route": route,
        "status": status,
        "client_ip": f"198.51.100.{hash(key) % 200 + 1}",
        "latency_ms": 20 + n % 80,
        "bytes_out": 512 + (n * 37) % 4096,
    }


def write(name, records):
    records.sort(key=lambda r: r["timestamp"])
    with open(f"data/{name}", "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def main():
    rng = random.Random(7)
    keys = [(f"key_{TENANTS[i % 5]}_{i}", TENANTS[i % 5]) for i in range(120)]
    normal = []
    for n in range(6000):
        key, tenant = rng.choice(keys)
        t = START + timedelta(milliseconds=rng.randrange(300_000))
        route = rng.choice(ROUTES).replace("{id}", str(rng.randrange(1000)))
        normal.append(record(t, key, tenant, route, status=rng.choice([200] * 9 + [404]), n=n))
    for n, tenant in enumerate(["acme", "umbrella"]):
        normal.append(record(START + timedelta(seconds=100 + n), f"key_{tenant}_0", tenant, "/v1/exports", "POST", 202, n))
    write("normal.jsonl", normal)

    burst = []
    for n in range(70):
        burst.append(record(START + timedelta(milliseconds=500 * n), "key_globex_1", "globex", "/v1/search", n=n))
    for n in range(200):
        burst.append(record(START + timedelta(milliseconds=150 * n), "key_internal_loadtest", "acme", "/v1/search", n=n))
    write("globex-burst.jsonl", burst)

    write("exports.jsonl", [
        record(START, "key_hooli_4", "hooli", "/v1/exports", "POST", 202),
        record(START + timedelta(seconds=1), "key_acme_0", "acme", "/v1/exports", "POST", 202),
    ])


if __name__ == "__main__":
    main()
