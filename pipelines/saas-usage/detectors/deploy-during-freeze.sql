-- id: deploy-during-freeze
-- verdict: review
-- severity: medium
-- reason: {{actor}} of {{tenant}} started a deployment ({{action}}) while the deploy freeze is on
-- block_for: 30m
-- guidance: Deploys during a freeze need the release manager's approval (#release-mgmt); they approve by revoking this hold.
-- tags: change-management
SELECT e.actor, e.action, e.tenant
FROM events e
JOIN platform_state s ON s.flag = 'deploy-freeze' AND s.enabled
WHERE e.action LIKE '/v1/deployments%' AND e.method = 'POST'
