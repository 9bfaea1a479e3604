-- id: privileged-pod
-- verdict: block
-- severity: high
-- reason: {{actor}} created pod {{namespace}}/{{object_name}} running privileged or as root
-- guidance: Privileged and root containers need a security exception; the platform team grants it per namespace.
-- tags: privilege-escalation, T1611
SELECT actor, action, namespace, object_name, origin FROM (
  SELECT actor, action, namespace, object_name, origin, status,
         json_get_json(raw, 'requestObject', 'spec') AS spec
  FROM events
  WHERE action = 'create' AND resource = 'pods')
WHERE coalesce(status, 0) < 400
  AND (regexp_like(spec, '"privileged"\s*:\s*true')
       OR regexp_like(spec, '"runAsUser"\s*:\s*0\s*[,}]')
       OR regexp_like(spec, '"runAsNonRoot"\s*:\s*false'))
  AND NOT (actor LIKE 'system:%' AND namespace = 'kube-system')
