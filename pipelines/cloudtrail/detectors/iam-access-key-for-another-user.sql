-- id: iam-access-key-for-another-user
-- verdict: block
-- severity: high
-- reason: {{actor}} created an access key for another user, {{target_user}}
-- block_for: 1h
-- guidance: Users create their own keys; service keys come from the secrets pipeline. Ask IAM owners.
-- tags: persistence, T1098.001
SELECT actor, action, target_user, origin FROM (
  SELECT actor, action, origin,
         json_get_str(raw, 'requestParameters', 'userName') AS target_user,
         -- the caller's own name: the last segment of its ARN
         reverse(split_part(reverse(actor), '/', 1)) AS caller_name
  FROM events
  WHERE event_source = 'iam.amazonaws.com' AND action = 'CreateAccessKey' AND error_code IS NULL)
WHERE target_user IS NOT NULL AND target_user <> caller_name
