-- id: iam-admin-policy-attached
-- verdict: block
-- severity: critical
-- reason: {{actor}} attached AdministratorAccess to {{principal_kind}} {{target}}
-- block_for: 2h
-- guidance: Administrator access is granted only through the access-request workflow; IAM owners approve.
-- tags: persistence, privilege-escalation, T1098
SELECT actor, action,
       CASE action WHEN 'AttachUserPolicy' THEN 'user' WHEN 'AttachRolePolicy' THEN 'role' ELSE 'group' END AS principal_kind,
       coalesce(json_get_str(raw, 'requestParameters', 'userName'),
                json_get_str(raw, 'requestParameters', 'roleName'),
                json_get_str(raw, 'requestParameters', 'groupName')) AS target,
       origin
FROM events
WHERE event_source = 'iam.amazonaws.com'
  AND action IN ('AttachUserPolicy', 'AttachRolePolicy', 'AttachGroupPolicy')
  AND error_code IS NULL
  AND json_get_str(raw, 'requestParameters', 'policyArn') = 'arn:aws:iam::aws:policy/AdministratorAccess'
