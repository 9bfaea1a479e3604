-- id: sequence-case
-- verdict: alert
-- severity: low
-- reason: {{actor}} deleted {{puts}} puts after a failure at {{last_failure}}
SELECT actor, puts, last_failure FROM (
  SELECT actor, action, event_time,
         sum(CASE WHEN action = 'Put' THEN 1 ELSE 0 END) OVER w AS puts,
         max(CASE WHEN outcome = 'Failure' THEN event_time END) OVER w AS last_failure
  FROM events
  WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW))
WHERE action = 'Delete' AND puts >= 2 AND last_failure IS NOT NULL AND last_failure < event_time
