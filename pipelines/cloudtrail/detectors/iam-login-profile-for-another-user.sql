-- id: iam-login-profile-for-another-user
-- verdict: block
-- severity: high
-- reason: {{actor}} called {{action}} to set the console password of another user, {{target_user}}
-- block_for: 1h
-- guidance: Console passwords are reset by the user or by the IAM owners' reset procedure.
-- tags: persistence, privilege-escalation, T1098
SELECT actor, action, target_user, origin FROM (
  SELECT actor, action, origin,
         json_get_str(raw, 'requestParameters', 'userName') AS target_user,
         reverse(split_part(reverse(actor), '/', 1)) AS caller_name
  FROM events
  WHERE event_source = 'iam.amazonaws.com'
    AND action IN ('CreateLoginProfile', 'UpdateLoginProfile')
    AND error_code IS NULL)
WHERE target_user IS NOT NULL AND target_user <> caller_name
