-- id: ec2-password-data-burst
-- verdict: block
-- severity: high
-- reason: {{actor}} asked for the Windows password data of instances {{n}} times within 10 minutes
-- block_for: 1h
-- guidance: Instance passwords are read through the bastion's vault integration; ask the platform team.
-- tags: credential-access, T1552.005
SELECT actor, n FROM (
  SELECT actor, count(*) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW) AS n
  FROM events
  WHERE event_source = 'ec2.amazonaws.com' AND action = 'GetPasswordData')
WHERE n >= 10
