-- id: denied-then-allowed
-- verdict: alert
-- severity: high
-- reason: {{actor}} was denied {{action}} {{denied}} times within 10 minutes, then it succeeded
-- guidance: Someone probed this write until it went through: check what changed in between (a policy, a role, another identity).
-- tags: privilege-escalation, discovery, T1078
SELECT actor, action, denied, origin FROM (
  SELECT actor, action, origin, error_code,
         count(*) FILTER (WHERE error_code IN ('AccessDenied', 'AccessDeniedException',
                                               'Client.UnauthorizedOperation', 'UnauthorizedOperation'))
           OVER (PARTITION BY actor, action ORDER BY event_time
                 RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS denied
  FROM events
  -- Writes only: reads denied and then allowed are everyday noise.
  WHERE NOT coalesce(read_only, false) AND action <> 'ConsoleLogin')
WHERE error_code IS NULL AND denied >= 3
