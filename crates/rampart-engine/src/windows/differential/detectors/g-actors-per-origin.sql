-- id: g-actors-per-origin
-- verdict: alert
-- severity: low
-- reason: {origin}
SELECT origin, date_bin(INTERVAL '1 hour', event_time, TIMESTAMP '2024-08-01T00:30:00Z') AS hour FROM events GROUP BY origin, date_bin(INTERVAL '1 hour', event_time, TIMESTAMP '2024-08-01T00:30:00Z') HAVING count(DISTINCT actor) >= 3 AND sum(json_get_int(raw, 'bytes')) > 100000
