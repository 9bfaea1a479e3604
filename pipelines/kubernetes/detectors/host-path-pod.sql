-- id: host-path-pod
-- verdict: block
-- severity: high
-- reason: {{actor}} created pod {{namespace}}/{{object_name}} mounting the node's filesystem (hostPath)
-- guidance: hostPath volumes reach the node; use a persistent volume, or ask the platform team for an exception.
-- tags: privilege-escalation, T1611
SELECT actor, action, namespace, object_name, origin FROM (
  SELECT actor, action, namespace, object_name, origin, status,
         json_get_json(raw, 'requestObject', 'spec', 'volumes') AS volumes
  FROM events
  WHERE action = 'create' AND resource = 'pods')
WHERE coalesce(status, 0) < 400
  AND volumes LIKE '%"hostPath"%'
  AND NOT (actor LIKE 'system:%' AND namespace = 'kube-system')
