-- id: trail-logging-not-restarted
-- verdict: alert
-- severity: critical
-- reason: {{actor}} stopped trail {{trail}} and it was not started again within 15 minutes
-- guidance: An audit trail left stopped is a blind spot, whoever stopped it. Start it again (aws cloudtrail start-logging --name TRAIL), then find out why it stopped and what happened while it was.
-- tags: defense-evasion, T1562.008
-- An absence: StopLogging (A) not followed by a StartLogging (B) of the same trail within 15
-- minutes. The frame looks ahead, so each StopLogging is decided 15 minutes (plus the allowed
-- lateness) after it.
SELECT actor, trail, origin FROM (
  SELECT actor, action, origin, trail,
         count(*) FILTER (WHERE action = 'StartLogging') OVER w AS restarts
  FROM (
    SELECT actor, action, origin, event_time,
           json_get_str(raw, 'requestParameters', 'name') AS trail
    FROM events
    WHERE event_source = 'cloudtrail.amazonaws.com'
      AND action IN ('StopLogging', 'StartLogging')
      AND error_code IS NULL)
  WINDOW w AS (PARTITION BY trail ORDER BY event_time
               RANGE BETWEEN CURRENT ROW AND INTERVAL '15 minutes' FOLLOWING))
WHERE action = 'StopLogging' AND restarts = 0
