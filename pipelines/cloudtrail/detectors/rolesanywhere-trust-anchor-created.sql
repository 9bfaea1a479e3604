-- id: rolesanywhere-trust-anchor-created
-- verdict: alert
-- severity: medium
-- reason: {{actor}} created an IAM Roles Anywhere trust anchor {{anchor}}: certificates from it can assume roles
-- tags: persistence, T1098
SELECT actor, action, json_get_str(raw, 'requestParameters', 'name') AS anchor, origin
FROM events
WHERE event_source = 'rolesanywhere.amazonaws.com'
  AND action = 'CreateTrustAnchor'
  AND error_code IS NULL
