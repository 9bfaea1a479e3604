-- id: failures-or-delete
-- verdict: alert
-- severity: low
-- reason: {actor}
-- A condition on the window value OR on the row: no row may be left unjudged for its count.
SELECT actor, n FROM (SELECT actor, action, count(*) OVER (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n FROM events WHERE outcome = 'Failure') WHERE n >= 7 OR action = 'Delete'
