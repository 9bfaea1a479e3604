-- id: export-not-in-plan
-- verdict: block
-- severity: low
-- reason: {{tenant}} (plan {{plan}}) called {{action}}, which plan {{plan}} does not include
-- block_for: 10m
-- guidance: Bulk exports come with the business and enterprise plans; billing can upgrade the account.
-- tags: entitlement
SELECT e.actor, e.action, e.tenant, p.plan
FROM events e
JOIN tenants t ON e.tenant = t.tenant
JOIN plans p ON t.plan = p.plan
WHERE e.action LIKE '/v1/exports%' AND e.method = 'POST' AND NOT p.exports_included
