-- id: failures-many
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, many FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW) AS many FROM events WHERE outcome = 'Failure') WHERE many >= 9
