-- id: g-approx
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, date_bin(INTERVAL '30 minutes', event_time) AS half_hour FROM events GROUP BY actor, date_bin(INTERVAL '30 minutes', event_time) HAVING approx_distinct(origin) >= 5
