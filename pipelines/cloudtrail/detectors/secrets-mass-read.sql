-- id: secrets-mass-read
-- verdict: block
-- severity: critical
-- reason: {{actor}} read {{secrets}} different secrets within 1 hour
-- block_for: 2h
-- guidance: Bulk secret access goes through the secrets pipeline; the secrets owners approve exceptions.
-- tags: credential-access, T1555.006
SELECT actor, secrets FROM (
  SELECT actor, count(DISTINCT secret) OVER (PARTITION BY actor ORDER BY event_time
         RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS secrets
  FROM (SELECT actor, event_time, json_get_str(raw, 'requestParameters', 'secretId') AS secret
        FROM events
        WHERE event_source = 'secretsmanager.amazonaws.com' AND action = 'GetSecretValue' AND error_code IS NULL))
WHERE secrets >= 20
