-- id: iam-change-after-login-without-mfa
-- verdict: block
-- severity: high
-- reason: {{actor}} changed IAM ({{action}}) within 10 minutes of signing in to the console without MFA (at {{signed_in_at}})
-- block_for: 1h
-- guidance: IAM changes need an MFA session: sign in again with MFA; your security team reviews the change.
-- tags: persistence, privilege-escalation, T1098
SELECT actor, action, signed_in_at, origin FROM (
  SELECT actor, action, origin, event_source, error_code,
         max(CASE WHEN action = 'ConsoleLogin' AND outcome = 'Success'
                       AND json_get_str(raw, 'additionalEventData', 'MFAUsed') = 'No'
                  THEN event_time END)
           OVER (PARTITION BY actor ORDER BY event_time
                 RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS signed_in_at
  FROM events
  WHERE action = 'ConsoleLogin' OR event_source = 'iam.amazonaws.com')
WHERE event_source = 'iam.amazonaws.com'
  AND error_code IS NULL
  AND signed_in_at IS NOT NULL
  AND NOT regexp_like(action, '^(Get|List|Generate|Simulate)')
