-- id: spread
-- verdict: alert
-- severity: low
-- reason: {origin}
SELECT origin, actor, d FROM (SELECT origin, actor, count(DISTINCT action) OVER (PARTITION BY origin ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS d FROM events) WHERE d >= 4
