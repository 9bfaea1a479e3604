-- id: network-logs-deleted
-- verdict: alert
-- severity: high
-- reason: {{actor}} deleted {{what}} ({{action}})
-- tags: defense-evasion, T1562.008
SELECT actor, action,
       CASE action WHEN 'DeleteFlowLogs' THEN 'VPC flow logs' ELSE 'Route 53 resolver query logging' END AS what,
       origin
FROM events
WHERE error_code IS NULL
  AND ((event_source = 'ec2.amazonaws.com' AND action = 'DeleteFlowLogs')
    OR (event_source = 'route53resolver.amazonaws.com' AND action = 'DeleteResolverQueryLogConfig'))
