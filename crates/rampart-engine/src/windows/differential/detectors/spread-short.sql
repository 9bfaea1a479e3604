-- id: spread-short
-- verdict: alert
-- severity: low
-- reason: {origin}
SELECT origin, actor, recent FROM (SELECT origin, actor, count(DISTINCT action) OVER (PARTITION BY origin ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS recent FROM events) WHERE recent >= 4
