-- id: actions-per-origin
-- verdict: review
-- severity: medium
-- reason: {{origin}} called {{actions}} different APIs within 10 minutes
-- tags: discovery
SELECT origin, actor, actions FROM (
  SELECT origin, actor, count(DISTINCT action) OVER (PARTITION BY origin ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS actions
  FROM events)
WHERE actions >= 200
