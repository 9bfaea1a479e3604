-- id: filtered
-- verdict: alert
-- severity: low
-- reason: {{actor}} failed {{failures}} of {{calls}} calls, deleted from {{delete_origins}} origins
SELECT actor, calls, failures, delete_origins FROM (
  SELECT actor, action,
         count(*) OVER w AS calls,
         count(*) FILTER (WHERE outcome = 'Failure') OVER w AS failures,
         count(DISTINCT origin) FILTER (WHERE action = 'Delete') OVER w AS delete_origins,
         sum(CAST(json_get_int(raw, 'bytes') AS BIGINT)) FILTER (WHERE action IN ('Get', 'List')) OVER w AS read_bytes
  FROM events
  WINDOW w AS (PARTITION BY actor ORDER BY event_time RANGE BETWEEN INTERVAL '5 minutes' PRECEDING AND CURRENT ROW))
WHERE failures >= 4 AND (delete_origins >= 2 OR read_bytes > 20000)
