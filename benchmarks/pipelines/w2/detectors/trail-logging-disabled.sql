-- id: trail-logging-disabled
-- verdict: block
-- severity: critical
-- reason: {{actor}} called {{action}} on trail {{trail}}: audit logging is being switched off
-- block_for: 4h
-- guidance: Trails are only stopped through a change request. Security on-call re-enables
--    the trail and lifts the block once the change is confirmed.
-- tags: defense-evasion, T1562.008
-- description: Stopping or deleting a CloudTrail trail (Stratus aws.defense-evasion.cloudtrail-stop/-delete).
SELECT actor, action, json_get_str(raw, 'requestParameters', 'name') AS trail, origin, region
FROM events
WHERE event_source = 'cloudtrail.amazonaws.com'
  AND action IN ('StopLogging', 'DeleteTrail')
  AND error_code IS NULL
