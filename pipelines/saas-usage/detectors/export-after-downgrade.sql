-- id: export-after-downgrade
-- verdict: review
-- severity: high
-- reason: {{actor}} of {{tenant}} started a bulk export ({{action}}) within 1 hour of the account's plan downgrade (at {{downgraded_at}})
-- block_for: 1h
-- guidance: A downgrade followed by a bulk export is how a leaving customer (or whoever holds their key) takes the data with them; account management confirms with the customer and approves by revoking this hold.
-- tags: exfiltration, churn, T1567
-- A sequence: B (a bulk export) after A (a plan downgrade) within an hour, by any key of the
-- same tenant (the downgrade is usually an admin's key, the export another).
SELECT actor, action, tenant, downgraded_at FROM (
  SELECT actor, action, tenant, method, status,
         max(CASE WHEN action = '/v1/billing/downgrade' AND method = 'POST'
                       AND coalesce(status, 0) < 400
                  THEN event_time END)
           OVER (PARTITION BY tenant ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS downgraded_at
  FROM events
  WHERE action = '/v1/billing/downgrade' OR action LIKE '/v1/exports%')
WHERE action LIKE '/v1/exports%' AND method = 'POST'
  AND downgraded_at IS NOT NULL
