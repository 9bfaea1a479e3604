-- id: root-console-login-failures
-- verdict: block
-- severity: critical
-- reason: {{n}} failed root console logins for {{actor}} within 15 minutes
-- block_for: 1h
-- guidance: Reset the root password through the break-glass procedure; security on-call approves.
-- tags: credential-access, T1110
SELECT actor, origin, n FROM (
  SELECT actor, origin, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '15 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE action = 'ConsoleLogin' AND outcome = 'Failure' AND user_type = 'Root')
WHERE n >= 5
