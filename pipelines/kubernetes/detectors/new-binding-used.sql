-- id: new-binding-used
-- verdict: alert
-- severity: high
-- reason: {{actor}} used the API ({{action}} {{resource}}) within 10 minutes of a role binding granting it permissions (at {{bound_at}})
-- dedup_for: 1h
-- guidance: A binding made and used within minutes is how a foothold becomes persistence; check who made the binding and why.
-- tags: privilege-escalation, persistence, T1078
-- A sequence: B (any request by a principal) after A (a role binding naming it as its first
-- subject) within 10 minutes. The window is keyed by the principal: the binding's subject for
-- A, the requester for B.
SELECT actor, action, resource, bound_at FROM (
  SELECT actor, action, resource, created, status, event_time,
         max(CASE WHEN created THEN event_time END) OVER (PARTITION BY principal ORDER BY event_time
             RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS bound_at
  FROM (
    SELECT actor, action, resource, status, event_time,
           resource IN ('rolebindings', 'clusterrolebindings') AND action = 'create'
             AND coalesce(status, 0) < 400 AS created,
           CASE WHEN resource IN ('rolebindings', 'clusterrolebindings') AND action = 'create' THEN
                  CASE json_get_str(raw, 'requestObject', 'subjects', 0, 'kind')
                    WHEN 'ServiceAccount' THEN concat('system:serviceaccount:',
                         coalesce(json_get_str(raw, 'requestObject', 'subjects', 0, 'namespace'), namespace), ':',
                         json_get_str(raw, 'requestObject', 'subjects', 0, 'name'))
                    ELSE json_get_str(raw, 'requestObject', 'subjects', 0, 'name') END
                ELSE actor END AS principal
    FROM events))
WHERE NOT created AND bound_at IS NOT NULL AND coalesce(status, 0) < 400
