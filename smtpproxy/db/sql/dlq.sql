-- Dead letters: messages that ended dlq (gave up), failed (refused) or storage_error.

-- name: dlq_select
-- Filters are optional (NULL matches everything); ids, when given, restrict further.
SELECT m.id, t.name AS tenant, a.username AS account, m.status, m.attempts,
       m.provider_name AS provider, m.finished_at, m.last_error, m.rcpt_to,
       m.storage_key, m.body_deleted_at, m.tenant_id
FROM messages m
JOIN tenants t ON t.id = m.tenant_id
JOIN accounts a ON a.id = m.account_id
WHERE m.status = ANY(%(statuses)s)
  AND (%(ids)s::text[] IS NULL OR m.id = ANY(%(ids)s))
  AND (%(tenant)s::text IS NULL OR t.name = %(tenant)s)
  AND (%(provider)s::text IS NULL OR m.provider_name = %(provider)s)
  AND (%(since)s::timestamptz IS NULL OR m.finished_at >= %(since)s)
  AND (%(reason)s::text IS NULL OR m.last_error ILIKE '%%' || %(reason)s || '%%')
ORDER BY m.finished_at DESC NULLS LAST, m.id
LIMIT %(limit)s

-- name: dlq_requeue
-- Back to the queue with a fresh attempt count, optionally through another provider.
-- A message whose body was lost (storage_error) cannot be sent again.
UPDATE messages
SET status = 'queued', attempts = 0, next_attempt_at = NULL, finished_at = NULL,
    last_error = NULL, route_override = %(provider)s, replayed_at = now(), updated_at = now()
WHERE id = ANY(%(ids)s) AND status IN ('dlq', 'failed')
RETURNING id, tenant_id, account_id

-- name: dlq_delete
DELETE FROM messages
WHERE id = ANY(%(ids)s) AND status IN ('dlq', 'failed', 'storage_error')
  AND NOT EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = messages.id)
RETURNING id, storage_key

-- name: storage_key_in_use
SELECT EXISTS (SELECT 1 FROM messages WHERE storage_key = %s)
