-- A window over a window: not incremental; its window part re-runs per touched key.
-- id: nested
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, m FROM (SELECT actor, max(n) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW) AS m FROM (SELECT actor, event_time, count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS n FROM events WHERE outcome = 'Failure')) WHERE m >= 6
