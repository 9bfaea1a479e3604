-- id: g-failures
-- verdict: alert
-- severity: low
-- reason: {actor}
SELECT actor, date_bin(INTERVAL '10 minutes', event_time) AS bucket FROM events WHERE outcome = 'Failure' GROUP BY actor, date_bin(INTERVAL '10 minutes', event_time) HAVING count(*) >= 8
