-- id: secrets-across-namespaces
-- verdict: block
-- severity: high
-- reason: {{actor}} read secrets in {{namespaces}} namespaces within 10 minutes
-- guidance: Workloads read their own namespace's secrets; one principal sweeping many namespaces is collecting credentials.
-- tags: credential-access, T1552.007
SELECT actor, namespaces, origin FROM (
  SELECT actor, origin, count(DISTINCT namespace) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS namespaces
  FROM events
  WHERE resource = 'secrets' AND action IN ('get', 'list', 'watch') AND namespace IS NOT NULL
    AND coalesce(status, 0) < 400 AND coalesce(stage, 'ResponseComplete') = 'ResponseComplete'
    AND actor NOT LIKE 'system:serviceaccount:kube-system:%')
WHERE namespaces >= 5
