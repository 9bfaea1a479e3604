-- id: usage-hard-limit
-- verdict: block
-- severity: medium
-- reason: API key {{actor}} of {{tenant}} made {{n}} requests in one minute, over the hard limit of plan {{plan}} ({{hard_limit_per_minute}} per minute)
-- block_for: 2m
-- guidance: Requests resume after the block; for more capacity upgrade the plan (billing) or ask support for a temporary raise.
-- tags: usage, entitlement
SELECT actor, tenant, plan, n, hard_limit_per_minute FROM (
  SELECT e.actor, e.tenant, p.plan, p.hard_limit_per_minute,
         count(*) OVER (PARTITION BY e.actor ORDER BY e.event_time
                        RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND CURRENT ROW) AS n
  FROM events e
  JOIN tenants t ON e.tenant = t.tenant
  JOIN plans p ON t.plan = p.plan
  LEFT JOIN allowlist a ON e.actor = a.api_key
  WHERE a.api_key IS NULL)
WHERE n > hard_limit_per_minute
