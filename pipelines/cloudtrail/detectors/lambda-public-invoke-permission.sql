-- id: lambda-public-invoke-permission
-- verdict: block
-- severity: high
-- reason: {{actor}} let anyone ({{principal}}) call {{permission}} on Lambda function {{function}}
-- block_for: 1h
-- guidance: Public functions go behind API Gateway with authentication; the service owner approves.
-- tags: persistence, T1546
SELECT actor, action,
       json_get_str(raw, 'requestParameters', 'functionName') AS function,
       json_get_str(raw, 'requestParameters', 'principal') AS principal,
       json_get_str(raw, 'requestParameters', 'action') AS permission,
       origin
FROM events
WHERE event_source = 'lambda.amazonaws.com'
  AND action LIKE 'AddPermission%'
  AND error_code IS NULL
  AND json_get_str(raw, 'requestParameters', 'principal') = '*'
