-- id: failure-volume-per-actor
-- verdict: alert
-- severity: medium
-- reason: {{actor}} had {{failures}} failed calls within 15 minutes
-- tags: abuse
SELECT actor, failures FROM (
  SELECT actor, sum(CASE WHEN outcome <> 'Success' THEN 1 ELSE 0 END) OVER (PARTITION BY actor
         ORDER BY event_time RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW) AS failures
  FROM events)
WHERE failures >= 50000
