-- id: trail-event-selectors-narrowed
-- verdict: block
-- severity: high
-- reason: {{actor}} changed the event selectors of trail {{trail}} to stop recording management events
-- block_for: 4h
-- guidance: Trail selectors are managed by the security team; ask security on-call to review the change.
-- tags: defense-evasion, T1562.008
SELECT actor, action, json_get_str(raw, 'requestParameters', 'trailName') AS trail, origin
FROM events
WHERE event_source = 'cloudtrail.amazonaws.com'
  AND action = 'PutEventSelectors'
  AND error_code IS NULL
  AND json_get_bool(raw, 'requestParameters', 'eventSelectors', 0, 'includeManagementEvents') = false
