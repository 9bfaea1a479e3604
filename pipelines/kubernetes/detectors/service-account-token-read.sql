-- id: service-account-token-read
-- verdict: block
-- severity: high
-- reason: {{actor}} read a service account token inside pod {{namespace}}/{{object_name}} through exec
-- guidance: Tokens are mounted for the workload, not for people: rotate the service account's token and review what it can do.
-- tags: credential-access, T1528
SELECT actor, action, namespace, object_name, origin FROM (
  SELECT actor, action, namespace, object_name, origin, status,
         concat(coalesce(json_get_json(raw, 'requestObject', 'command'), ''), ' ', coalesce(request_uri, '')) AS command
  FROM events
  WHERE resource = 'pods' AND subresource = 'exec')
WHERE coalesce(status, 0) < 400
  AND (command LIKE '%/var/run/secrets/%serviceaccount%' OR command LIKE '%var%2Frun%2Fsecrets%serviceaccount%')
  -- The control plane's own accounts in their own namespace.
  AND NOT (actor LIKE 'system:serviceaccount:kube-system:%' AND namespace = 'kube-system')
