-- id: unverified-trial-burst
-- verdict: block
-- severity: medium
-- reason: {{actor}} of {{tenant}} made {{n}} requests in one minute before verifying the trial it signed up for at {{signed_up_at}} (at most 30 per minute until verified)
-- block_for: 10m
-- guidance: Trial accounts are limited to 30 requests per minute until their e-mail address is verified; verify it (POST /v1/verify) and the limit is the plan's.
-- tags: abuse, trial, usage
-- A sequence with a count: after A (a trial sign-up) and without C (its verification) since,
-- more than 30 requests within a minute. Trial tenants are in no plan yet, so the plan limits
-- (usage-soft-limit, usage-hard-limit) do not reach them.
SELECT actor, tenant, n, signed_up_at FROM (
  SELECT actor, tenant,
         max(CASE WHEN action = '/v1/signup' AND coalesce(status, 0) < 400 THEN event_time END)
           OVER (PARTITION BY tenant ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 day' PRECEDING AND CURRENT ROW) AS signed_up_at,
         max(CASE WHEN action = '/v1/verify' AND coalesce(status, 0) < 400 THEN event_time END)
           OVER (PARTITION BY tenant ORDER BY event_time
                 RANGE BETWEEN INTERVAL '1 day' PRECEDING AND CURRENT ROW) AS verified_at,
         count(*) OVER (PARTITION BY tenant ORDER BY event_time
                        RANGE BETWEEN INTERVAL '1 minute' PRECEDING AND CURRENT ROW) AS n
  FROM events)
WHERE signed_up_at IS NOT NULL
  AND (verified_at IS NULL OR verified_at < signed_up_at)
  AND n > 30
