-- id: failures-longer
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, n FROM (SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '20 minutes' PRECEDING AND CURRENT ROW) AS n FROM events WHERE outcome = 'Failure') WHERE n >= 6
