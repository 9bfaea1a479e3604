-- id: recon-denied-calls
-- verdict: alert
-- severity: medium
-- reason: {{actor}} was denied {{n}} List/Describe/Get calls within 10 minutes (last: {{action}})
-- tags: discovery, T1580
SELECT actor, action, n FROM (
  SELECT actor, action, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE error_code IN ('AccessDenied', 'Client.UnauthorizedOperation', 'UnauthorizedOperation')
    AND (action LIKE 'List%' OR action LIKE 'Describe%' OR action LIKE 'Get%'))
WHERE n >= 15
