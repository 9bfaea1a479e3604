-- id: usage-soft-limit
-- verdict: alert
-- severity: low
-- reason: API key {{actor}} of {{tenant}} made {{n}} requests in one minute; plan {{plan}} includes {{soft_limit_per_minute}} per minute (hard limit {{hard_limit_per_minute}})
-- dedup_for: 10m
-- guidance: The customer is near the plan's limit: account management may offer an upgrade.
-- tags: usage, entitlement
SELECT actor, tenant, plan, n, soft_limit_per_minute, hard_limit_per_minute FROM (
  SELECT e.actor, e.tenant, p.plan, p.soft_limit_per_minute, p.hard_limit_per_minute,
         count(*) OVER (PARTITION BY e.actor ORDER BY e.event_time
                        RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND CURRENT ROW) AS n
  FROM events e
  JOIN tenants t ON e.tenant = t.tenant
  JOIN plans p ON t.plan = p.plan
  LEFT JOIN allowlist a ON e.actor = a.api_key
  WHERE a.api_key IS NULL)
WHERE n > soft_limit_per_minute AND n <= hard_limit_per_minute
