-- id: lambda-code-overwritten
-- verdict: review
-- severity: medium
-- reason: {{actor}} ({{user_type}}) replaced the code of Lambda function {{function}} outside the deploy pipeline
-- guidance: Lambda code ships through CI/CD; the service owner approves manual hot-fixes.
-- tags: persistence, execution, T1525
SELECT actor, action, user_type, json_get_str(raw, 'requestParameters', 'functionName') AS function, origin
FROM events
WHERE event_source = 'lambda.amazonaws.com'
  AND action LIKE 'UpdateFunctionCode%'
  AND error_code IS NULL
  AND (user_type IN ('IAMUser', 'FederatedUser', 'Root') OR actor LIKE '%/AWSReservedSSO_%')
