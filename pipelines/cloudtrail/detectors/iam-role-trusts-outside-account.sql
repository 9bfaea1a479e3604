-- id: iam-role-trusts-outside-account
-- verdict: block
-- severity: critical
-- reason: {{actor}} made role {{role}} assumable from outside account {{tenant}} ({{action}})
-- block_for: 2h
-- guidance: Cross-account trust needs a security review; open a ticket with the account owners.
-- tags: persistence, T1098.003
WITH trust_changes AS (
  SELECT actor, action, tenant, origin,
         json_get_str(raw, 'requestParameters', 'roleName') AS role,
         coalesce(json_get_str(raw, 'requestParameters', 'policyDocument'),
                  json_get_str(raw, 'requestParameters', 'assumeRolePolicyDocument')) AS trust
  FROM events
  WHERE event_source = 'iam.amazonaws.com'
    AND action IN ('UpdateAssumeRolePolicy', 'CreateRole')
    AND error_code IS NULL)
SELECT actor, action, tenant, role, origin
FROM trust_changes
WHERE regexp_like(trust, '"(Principal|AWS)"\s*:\s*"\*"')
   -- an account id other than this one among the AWS principals
   OR regexp_like(regexp_replace(trust, 'arn:aws:iam::' || tenant || ':', '', 'g'), 'arn:aws:iam::[0-9]{12}:')
