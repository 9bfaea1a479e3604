-- id: anonymous-api-access
-- verdict: alert
-- severity: high
-- reason: an anonymous request from {{origin}} reached the API server ({{action}} {{request_uri}}, status {{status}})
-- dedup_for: 1h
-- guidance: Turn anonymous auth off (--anonymous-auth=false) or restrict the system:anonymous bindings; keep the API endpoint private.
-- tags: initial-access, T1190
SELECT actor, action, origin, request_uri, status
FROM events
WHERE actor = 'system:anonymous'
  AND origin IS NOT NULL
  -- Health checks of load balancers and probes come from private or loopback addresses.
  AND NOT regexp_like(origin, '^(10\.|172\.(1[6-9]|2[0-9]|3[01])\.|192\.168\.|127\.|::1$)')
