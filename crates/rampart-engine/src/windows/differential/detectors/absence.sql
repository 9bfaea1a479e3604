-- id: absence
-- verdict: alert
-- severity: low
-- reason: {{actor}} deleted from {{origin}} and put nothing within 5 minutes after
SELECT actor, origin FROM (
  SELECT actor, action, origin,
         count(*) FILTER (WHERE action = 'Put') OVER w AS puts_after
  FROM events
  WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN CURRENT ROW AND INTERVAL '5 minutes' FOLLOWING))
WHERE action = 'Delete' AND puts_after = 0
