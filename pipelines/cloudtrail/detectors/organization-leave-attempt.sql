-- id: organization-leave-attempt
-- verdict: block
-- severity: critical
-- reason: {{actor}} tried to take account {{tenant}} out of the AWS organization (outcome: {{outcome}})
-- block_for: 24h
-- guidance: Leaving the organization removes every guardrail; only the cloud platform team does it, by change request.
-- tags: defense-evasion, T1562
SELECT actor, action, tenant, outcome, origin
FROM events
WHERE event_source = 'organizations.amazonaws.com'
  AND action = 'LeaveOrganization'
