-- id: volume
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, origin, action FROM events QUALIFY sum(json_get_int(raw, 'bytes')) OVER (PARTITION BY actor, origin ORDER BY event_time RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) > 40000
