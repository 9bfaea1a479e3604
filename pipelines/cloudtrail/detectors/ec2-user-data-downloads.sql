-- id: ec2-user-data-downloads
-- verdict: alert
-- severity: medium
-- reason: {{actor}} downloaded instance user data {{n}} times within 10 minutes (user data often holds secrets)
-- tags: discovery, credential-access, T1552
SELECT actor, n FROM (
  SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE event_source = 'ec2.amazonaws.com' AND action = 'DescribeInstanceAttribute'
    AND json_get_str(raw, 'requestParameters', 'attribute') = 'userData')
WHERE n >= 10
