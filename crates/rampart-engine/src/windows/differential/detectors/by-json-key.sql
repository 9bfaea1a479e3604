-- id: by-json-key
-- verdict: alert
-- severity: low
-- reason: {team}
SELECT team, n FROM (SELECT json_get_str(raw, 'team') AS team, count(*) OVER (PARTITION BY json_get_str(raw, 'team') ORDER BY event_time RANGE BETWEEN INTERVAL '2 minutes' PRECEDING AND CURRENT ROW) AS n FROM events WHERE action = 'Delete') WHERE n >= 6
