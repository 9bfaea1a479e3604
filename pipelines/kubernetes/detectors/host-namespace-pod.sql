-- id: host-namespace-pod
-- verdict: block
-- severity: high
-- reason: {{actor}} created pod {{namespace}}/{{object_name}} sharing the node's {{shared}} namespace
-- guidance: Host network, PID and IPC namespaces reach every process on the node; only node agents in kube-system may use them.
-- tags: privilege-escalation, T1611
SELECT actor, action, namespace, object_name, origin,
       concat_ws(', ',
         CASE WHEN json_get_bool(raw, 'requestObject', 'spec', 'hostNetwork') THEN 'network' END,
         CASE WHEN json_get_bool(raw, 'requestObject', 'spec', 'hostPID') THEN 'PID' END,
         CASE WHEN json_get_bool(raw, 'requestObject', 'spec', 'hostIPC') THEN 'IPC' END) AS shared
FROM events
WHERE action = 'create' AND resource = 'pods'
  AND coalesce(status, 0) < 400
  AND (coalesce(json_get_bool(raw, 'requestObject', 'spec', 'hostNetwork'), false)
       OR coalesce(json_get_bool(raw, 'requestObject', 'spec', 'hostPID'), false)
       OR coalesce(json_get_bool(raw, 'requestObject', 'spec', 'hostIPC'), false))
  AND NOT (actor LIKE 'system:%' AND namespace = 'kube-system')
