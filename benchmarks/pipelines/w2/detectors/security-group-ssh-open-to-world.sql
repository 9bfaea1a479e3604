-- id: security-group-ssh-open-to-world
-- verdict: block
-- severity: high
-- reason: {{actor}} opened port 22 of security group {{group_id}} to {{cidr}}
-- block_for: 1h
-- guidance: SSH goes through the bastion or Session Manager; network owners approve exceptions.
-- tags: exfiltration, initial-access, T1098
SELECT actor, action, group_id, cidr, from_port, to_port, origin FROM (
  SELECT actor, action, origin,
         json_get_str(raw, 'requestParameters', 'groupId') AS group_id,
         coalesce(json_get_str(raw, 'requestParameters', 'cidrIp'),
                  json_get_str(raw, 'requestParameters', 'ipPermissions', 'items', 0, 'ipRanges', 'items', 0, 'cidrIp')) AS cidr,
         coalesce(json_get_int(raw, 'requestParameters', 'fromPort'),
                  json_get_int(raw, 'requestParameters', 'ipPermissions', 'items', 0, 'fromPort')) AS from_port,
         coalesce(json_get_int(raw, 'requestParameters', 'toPort'),
                  json_get_int(raw, 'requestParameters', 'ipPermissions', 'items', 0, 'toPort')) AS to_port
  FROM events
  WHERE event_source = 'ec2.amazonaws.com'
    AND action = 'AuthorizeSecurityGroupIngress'
    AND error_code IS NULL)
WHERE cidr LIKE '%/0' AND from_port <= 22 AND to_port >= 22
