-- id: console-login-without-mfa
-- verdict: review
-- severity: medium
-- reason: {{actor}} signed in to the console from {{origin}} without MFA
-- guidance: Enrol an MFA device (IAM > Security credentials). Until then, sensitive actions wait
--    for approval by your team lead.
-- tags: initial-access, T1078
SELECT actor, action, origin, user_type
FROM events
WHERE action = 'ConsoleLogin'
  AND outcome = 'Success'
  AND user_type IN ('IAMUser', 'Root')
  AND json_get_str(raw, 'additionalEventData', 'MFAUsed') = 'No'
  AND json_get_str(raw, 'additionalEventData', 'SamlProviderArn') IS NULL
