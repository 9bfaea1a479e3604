-- id: cluster-admin-binding
-- verdict: block
-- severity: critical
-- reason: {{actor}} bound the cluster role {{role}} cluster-wide ({{object_name}})
-- guidance: Cluster-wide admin bindings are made by the platform team's pipeline only; delete the binding if it is not theirs.
-- tags: privilege-escalation, persistence, T1078
SELECT actor, action, object_name, role, origin FROM (
  SELECT actor, action, object_name, origin, status,
         json_get_str(raw, 'requestObject', 'roleRef', 'name') AS role
  FROM events
  WHERE resource = 'clusterrolebindings' AND action IN ('create', 'update', 'patch'))
WHERE coalesce(status, 0) < 400
  AND role IN ('cluster-admin', 'admin', 'edit', 'system:masters', 'system:kube-controller-manager',
               'system:kube-scheduler', 'system:node')
  AND actor NOT LIKE 'system:%'
