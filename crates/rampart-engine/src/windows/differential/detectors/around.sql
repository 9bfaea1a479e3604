-- id: around
-- verdict: alert
-- severity: low
-- reason: {{actor}} failed {{failures}} times from a minute before to 15 minutes after, from {{origins}} origins
SELECT actor, failures, origins FROM (
  SELECT actor, outcome,
         count(*) FILTER (WHERE outcome = 'Failure') OVER w AS failures,
         count(DISTINCT origin) OVER w AS origins
  FROM events
  WINDOW w AS (PARTITION BY actor ORDER BY event_time
               RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND INTERVAL '15 minutes' FOLLOWING))
WHERE outcome = 'Failure' AND failures >= 5
