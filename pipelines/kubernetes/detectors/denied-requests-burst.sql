-- id: denied-requests-burst
-- verdict: block
-- severity: medium
-- reason: {{actor}} was denied {{n}} API requests within 5 minutes
-- block_for: 30m
-- guidance: A principal probing its permissions; check whose credentials these are.
-- tags: discovery, T1613
SELECT actor, n, origin FROM (
  SELECT actor, origin, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE status IN (401, 403) AND coalesce(stage, 'ResponseComplete') = 'ResponseComplete')
WHERE n >= 20
