-- id: range
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, hi - lo AS spread, m, c FROM (SELECT actor, max(json_get_int(raw, 'bytes')) OVER w AS hi, min(json_get_int(raw, 'bytes')) OVER w AS lo, avg(json_get_int(raw, 'bytes')) OVER w AS m, count(json_get_int(raw, 'bytes')) OVER w AS c FROM events WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW)) WHERE hi - lo > 9000
