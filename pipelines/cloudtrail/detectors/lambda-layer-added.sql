-- id: lambda-layer-added
-- verdict: review
-- severity: medium
-- reason: {{actor}} attached layers {{layers}} to Lambda function {{function}}
-- guidance: Layers and extensions run with the function's permissions; the service owner approves them.
-- tags: persistence, T1525
SELECT actor, action, json_get_str(raw, 'requestParameters', 'functionName') AS function,
       json_get_json(raw, 'requestParameters', 'layers') AS layers, origin
FROM events
WHERE event_source = 'lambda.amazonaws.com'
  AND action LIKE 'UpdateFunctionConfiguration%'
  AND error_code IS NULL
  AND json_length(raw, 'requestParameters', 'layers') > 0
