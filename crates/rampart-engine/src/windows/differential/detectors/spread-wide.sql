-- id: spread-wide
-- verdict: alert
-- severity: low
-- reason: {origin}
SELECT origin, actor, wide FROM (SELECT origin, actor, count(DISTINCT action) OVER (PARTITION BY origin ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS wide FROM events) WHERE wide >= 5 AND actor <> 'nobody'
