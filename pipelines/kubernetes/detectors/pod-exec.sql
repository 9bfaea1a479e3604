-- id: pod-exec
-- verdict: alert
-- severity: medium
-- reason: {{actor}} opened a shell ({{subresource}}) in pod {{namespace}}/{{object_name}}
-- dedup_for: 10m
-- guidance: Interactive access to running pods goes through the break-glass role; check the ticket.
-- tags: execution, T1609
SELECT actor, action, subresource, namespace, object_name, origin
FROM events
WHERE action IN ('create', 'get')
  AND resource = 'pods'
  AND subresource IN ('exec', 'attach')
  AND coalesce(status, 0) < 400
