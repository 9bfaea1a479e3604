-- id: api-rate-per-actor
-- verdict: block
-- severity: high
-- reason: {{actor}} made {{calls}} API calls within 1 minute (plan allows 12000)
-- block_for: 5m
-- tags: over-consumption
SELECT actor, calls FROM (
  SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND CURRENT ROW) AS calls
  FROM events)
WHERE calls > 12000
