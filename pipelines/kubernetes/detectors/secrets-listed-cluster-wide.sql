-- id: secrets-listed-cluster-wide
-- verdict: block
-- severity: critical
-- reason: {{actor}} listed the secrets of every namespace
-- guidance: Nothing but the control plane reads every secret at once; rotate what the listing returned.
-- tags: credential-access, T1552.007
SELECT actor, action, origin
FROM events
WHERE resource = 'secrets'
  AND action IN ('list', 'watch')
  AND namespace IS NULL
  AND coalesce(status, 0) < 400
  AND actor NOT LIKE 'system:serviceaccount:kube-system:%'
