-- id: rds-snapshot-shared
-- verdict: block
-- severity: high
-- reason: {{actor}} made RDS snapshot {{snapshot}} restorable by {{shared_with}}
-- block_for: 2h
-- guidance: Database snapshots leave the account only through the data-export request; data owners approve.
-- tags: exfiltration, T1537
SELECT actor, action,
       json_get_str(raw, 'requestParameters', 'dBSnapshotIdentifier') AS snapshot,
       json_get_json(raw, 'requestParameters', 'valuesToAdd') AS shared_with,
       origin
FROM events
WHERE event_source = 'rds.amazonaws.com'
  AND action IN ('ModifyDBSnapshotAttribute', 'ModifyDBClusterSnapshotAttribute')
  AND error_code IS NULL
  AND json_get_str(raw, 'requestParameters', 'attributeName') = 'restore'
  AND json_length(raw, 'requestParameters', 'valuesToAdd') > 0
