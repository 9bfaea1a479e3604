-- id: ami-shared
-- verdict: block
-- severity: high
-- reason: {{actor}} shared AMI {{image}} with {{shared_with}}
-- block_for: 2h
-- guidance: Images leave the account only through the data-export request; data owners approve.
-- tags: exfiltration, T1537
SELECT actor, action, image, shared_with, origin FROM (
  SELECT actor, action, origin, tenant,
         json_get_str(raw, 'requestParameters', 'imageId') AS image,
         coalesce(json_get_str(raw, 'requestParameters', 'launchPermission', 'add', 'items', 0, 'userId'),
                  json_get_str(raw, 'requestParameters', 'launchPermission', 'add', 'items', 0, 'group')) AS shared_with
  FROM events
  WHERE event_source = 'ec2.amazonaws.com'
    AND action = 'ModifyImageAttribute'
    AND error_code IS NULL
    AND json_get_str(raw, 'requestParameters', 'attributeType') = 'launchPermission')
WHERE shared_with = 'all' OR (regexp_like(shared_with, '^[0-9]{12}$') AND shared_with <> tenant)
