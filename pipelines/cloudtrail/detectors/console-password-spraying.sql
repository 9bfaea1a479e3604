-- id: console-password-spraying
-- verdict: alert
-- severity: high
-- reason: failed console logins for {{users}} different users of account {{tenant}} within 1 hour (password spraying from {{origin}})
-- tags: credential-access, T1110.003
SELECT tenant, origin, actor, users FROM (
  SELECT tenant, origin, actor, count(DISTINCT user_name) OVER (PARTITION BY tenant ORDER BY event_time
         RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS users
  FROM events
  WHERE action = 'ConsoleLogin' AND outcome = 'Failure')
WHERE users >= 5
