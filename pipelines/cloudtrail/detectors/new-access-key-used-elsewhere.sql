-- id: new-access-key-used-elsewhere
-- verdict: block
-- severity: high
-- reason: access key {{access_key}}, created at {{created_at}} from {{created_from}}, was used by {{actor}} ({{action}}) from another address, {{origin}}, within 10 minutes
-- block_for: 1h
-- guidance: A key created and then used from another address within minutes was most likely made for someone else: deactivate it (aws iam update-access-key --status Inactive) and find out who created it and why.
-- tags: persistence, credential-access, T1098.001
-- A sequence: B (a call signed with a long-term access key) after A (the key's creation)
-- within 10 minutes, from another address than A's. The window is keyed by the access key: the
-- created key's id for A, the signing key's id for B.
SELECT actor, action, origin, access_key, created_at, created_from FROM (
  SELECT actor, action, origin, access_key, created,
         max(CASE WHEN created THEN event_time END) OVER w AS created_at,
         max(CASE WHEN created THEN origin END) OVER w AS created_from
  FROM (
    SELECT actor, action, origin, event_time,
           action = 'CreateAccessKey' AND error_code IS NULL AS created,
           CASE WHEN action = 'CreateAccessKey' AND error_code IS NULL
                THEN json_get_str(raw, 'responseElements', 'accessKey', 'accessKeyId')
                ELSE access_key_id END AS access_key
    FROM events
    WHERE (action = 'CreateAccessKey' AND error_code IS NULL) OR access_key_id LIKE 'AKIA%')
  WINDOW w AS (PARTITION BY access_key ORDER BY event_time
               RANGE BETWEEN INTERVAL '10 minutes' PRECEDING AND CURRENT ROW))
WHERE NOT created AND created_at IS NOT NULL AND origin <> created_from
