-- id: ebs-snapshot-shared
-- verdict: block
-- severity: high
-- reason: {{actor}} shared EBS snapshot {{snapshot}} with {{shared_with}}
-- block_for: 2h
-- guidance: Snapshots leave the account only through the data-export request; data owners approve.
-- tags: exfiltration, T1537
SELECT actor, action, snapshot, shared_with, origin FROM (
  SELECT actor, action, origin, tenant,
         json_get_str(raw, 'requestParameters', 'snapshotId') AS snapshot,
         coalesce(json_get_str(raw, 'requestParameters', 'createVolumePermission', 'add', 'items', 0, 'userId'),
                  json_get_str(raw, 'requestParameters', 'createVolumePermission', 'add', 'items', 0, 'group')) AS shared_with
  FROM events
  WHERE event_source = 'ec2.amazonaws.com'
    AND action = 'ModifySnapshotAttribute'
    AND error_code IS NULL
    AND json_get_str(raw, 'requestParameters', 'attributeType') = 'CREATE_VOLUME_PERMISSION')
WHERE shared_with = 'all' OR (regexp_like(shared_with, '^[0-9]{12}$') AND shared_with <> tenant)
