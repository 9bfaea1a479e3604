-- id: next-delete
-- verdict: alert
-- severity: low
-- reason: {{actor}} failed a read and deleted at {{next_delete}}, within 2 minutes
SELECT actor, next_delete FROM (
  SELECT actor, action, outcome, event_time,
         min(CASE WHEN action = 'Delete' THEN event_time END) OVER w AS next_delete
  FROM events
  WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN CURRENT ROW AND INTERVAL '2 minutes' FOLLOWING))
WHERE action = 'Get' AND outcome = 'Failure' AND next_delete > event_time
