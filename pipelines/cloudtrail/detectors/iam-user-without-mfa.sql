-- id: iam-user-without-mfa
-- verdict: alert
-- severity: medium
-- reason: {{actor}} created IAM user {{user_name}} and no MFA device was enabled for it within an hour
-- guidance: Users are created with an MFA device (the onboarding runbook enables it in the same change). Ask the creator; a user made for persistence usually gets an access key instead.
-- tags: persistence, T1136.003
-- An absence: CreateUser (A) not followed by an EnableMFADevice (B) for the same user within an
-- hour. Decided an hour (plus the allowed lateness) after the user was created.
SELECT actor, user_name, origin FROM (
  SELECT actor, action, origin, user_name,
         count(*) FILTER (WHERE action = 'EnableMFADevice') OVER w AS mfa_enabled
  FROM (
    SELECT actor, action, origin, event_time,
           json_get_str(raw, 'requestParameters', 'userName') AS user_name
    FROM events
    WHERE event_source = 'iam.amazonaws.com'
      AND action IN ('CreateUser', 'EnableMFADevice')
      AND error_code IS NULL)
  WINDOW w AS (PARTITION BY user_name ORDER BY event_time
               RANGE BETWEEN CURRENT ROW AND INTERVAL '1 hour' FOLLOWING))
WHERE action = 'CreateUser' AND mfa_enabled = 0
