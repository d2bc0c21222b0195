-- Statements on messages and delivery_logs used by ingress, delivery and the scheduler.

-- name: insert_messages
-- One statement per batch. A submission that repeats one accepted within the duplicate
-- window (a client re-sending after a lost 250) is not inserted: the statement returns
-- it with the original's id instead. Repeating means the same account, header
-- Message-ID and body hash, and the same envelope: the same sender and the same set of
-- recipients (in any order). The same bytes to other recipients are a new message: an
-- MTA splitting a long recipient list, or a client told 452 for too many recipients,
-- sends exactly that.
WITH input AS (
    SELECT u.*, ARRAY(SELECT jsonb_array_elements_text(u.rcpt_json)) AS rcpt_to
    FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::jsonb[],
                %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],
                %s::int[], %s::text[], %s::text[], %s::text[], %s::text[])
        AS u(id, tenant_id, account_id, mail_from, rcpt_json, subject, header_message_id,
             header_from, header_to, header_cc, size, sha256, storage_key, client_ip, device)
),
dups AS (
    SELECT DISTINCT ON (i.id) i.id AS new_id, m.id AS original_id
    FROM input i
    JOIN messages m ON m.account_id = i.account_id
                   AND m.header_message_id = i.header_message_id
                   AND m.sha256 = i.sha256
    WHERE i.header_message_id <> '' AND m.header_message_id <> ''
      AND m.created_at > now() - make_interval(secs => %s)
      AND m.status <> 'enqueue_failed' AND m.parent_id IS NULL
      AND m.mail_from = i.mail_from
      AND m.rcpt_to @> i.rcpt_to AND m.rcpt_to <@ i.rcpt_to
    ORDER BY i.id, m.created_at
),
inserted AS (
    INSERT INTO messages (
        id, tenant_id, account_id, mail_from, rcpt_to, subject, header_message_id,
        header_from, header_to, header_cc, size, sha256, storage_key, client_ip, device,
        status)
    SELECT i.id, i.tenant_id, i.account_id, i.mail_from, i.rcpt_to, i.subject,
           i.header_message_id, i.header_from, i.header_to, i.header_cc, i.size, i.sha256,
           i.storage_key, i.client_ip, i.device, 'queued'
    FROM input i WHERE i.id NOT IN (SELECT new_id FROM dups)
)
SELECT new_id, original_id FROM dups

-- name: mark_enqueue_failed
-- Only rows still queued: one a consumer already claimed is in flight, and its client
-- must then be told 250.
UPDATE messages
SET status = 'enqueue_failed', last_error = %(reason)s, updated_at = now(), finished_at = now()
WHERE id = ANY(%(ids)s) AND status = 'queued'
RETURNING id

-- name: claim_messages
-- Compare-and-set to sending, for every id a stream read returned, in one statement. A
-- due queued/retrying row can be claimed, and a row in sending for longer than a
-- heartbeat lifetime whose consumer is gone: our own name when no task of ours holds
-- it any more (the caller leaves out the ids it holds), or a name missing from the
-- complete list of live consumers (queue/liveness.py). Anything else cannot; the
-- second part says what such a row is (no row: the entry points at nothing).
WITH claimed AS (
    UPDATE messages
    SET status = 'sending', attempts = attempts + 1, claimed_by = %(consumer)s,
        claimed_at = now(), updated_at = now()
    WHERE id = ANY(%(ids)s::text[])
      AND ((status IN ('queued', 'retrying')
            AND (next_attempt_at IS NULL OR next_attempt_at <= now()))
           OR (status = 'sending' AND claimed_at < now() - make_interval(secs => %(settle)s)
               AND (claimed_by = %(consumer)s
                    OR (%(live_complete)s
                        AND coalesce(claimed_by, '') <> ALL(%(live)s::text[])))))
    RETURNING id, tenant_id, account_id, mail_from, rcpt_to, storage_key, attempts,
              created_at, size, route_override, coalesce(replayed_at, created_at) AS age_from
)
SELECT *, 'sending' AS status FROM claimed
UNION ALL
SELECT id, tenant_id, account_id, mail_from, rcpt_to, storage_key, attempts, created_at,
       size, route_override, NULL, status
FROM messages WHERE id = ANY(%(ids)s::text[]) AND id NOT IN (SELECT id FROM claimed)

-- name: finish_claims
-- End the claims of a batch of attempts, each as its Finish says (delivery/records.py);
-- only rows this consumer still holds: an id missing from the result was taken over
-- meanwhile, and nothing of its attempt is recorded. A released claim (provider
-- saturated, or waiting for its mailbox's pace) does not count its attempt and keeps
-- the last provider, and the last error unless it says why it waits.
UPDATE messages m
SET status = u.status,
    attempts = m.attempts - CASE WHEN u.released THEN 1 ELSE 0 END,
    next_attempt_at = u.next_attempt_at,
    provider_name = CASE WHEN u.released THEN m.provider_name ELSE u.provider_name END,
    provider_message_id = coalesce(u.provider_message_id, m.provider_message_id),
    last_error = CASE WHEN u.released AND u.last_error IS NULL THEN m.last_error
                      ELSE u.last_error END,
    claimed_by = NULL, claimed_at = NULL, updated_at = now(),
    finished_at = CASE WHEN u.final THEN now() END
FROM unnest(%(ids)s::text[], %(statuses)s::text[], %(released)s::bool[],
            %(next_attempt_at)s::timestamptz[], %(providers)s::text[],
            %(provider_message_ids)s::text[], %(errors)s::text[], %(finals)s::bool[])
    AS u(id, status, released, next_attempt_at, provider_name, provider_message_id,
         last_error, final)
WHERE m.id = u.id AND m.status = 'sending' AND m.claimed_by = %(consumer)s
RETURNING m.id

-- name: insert_delivery_logs
-- The delivery_logs rows of a batch of attempts, in one statement.
INSERT INTO delivery_logs (
    message_id, account_id, tenant_id, provider_name, status, error_message,
    attempt_number, duration_ms, provider_message_id, recipients)
SELECT u.message_id, u.account_id, u.tenant_id, u.provider_name, u.status, u.error_message,
       u.attempt_number, u.duration_ms, u.provider_message_id,
       ARRAY(SELECT jsonb_array_elements_text(u.recipients))
FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::text[], %s::text[], %s::text[],
            %s::int[], %s::int[], %s::text[], %s::jsonb[])
    AS u(message_id, account_id, tenant_id, provider_name, status, error_message,
         attempt_number, duration_ms, provider_message_id, recipients)

-- name: insert_delivery_log
INSERT INTO delivery_logs (
    message_id, account_id, tenant_id, provider_name, status, error_message,
    attempt_number, duration_ms, provider_message_id, recipients)
VALUES (%(message_id)s, %(account_id)s, %(tenant_id)s, %(provider_name)s, %(status)s,
        %(error_message)s, %(attempt_number)s, %(duration_ms)s, %(provider_message_id)s,
        %(recipients)s)

-- name: take_due_retries
-- The scheduler moves due retrying rows back to queued (and XADDs them in the same
-- transaction); SKIP LOCKED lets several instances share the work.
UPDATE messages m
SET status = 'queued', next_attempt_at = NULL, updated_at = now()
FROM (SELECT id FROM messages
      WHERE status = 'retrying' AND next_attempt_at <= now()
      ORDER BY next_attempt_at
      LIMIT %(limit)s
      FOR UPDATE SKIP LOCKED) due
WHERE m.id = due.id
RETURNING m.id, m.tenant_id, m.account_id

-- name: stale_queued
-- Live rows that may have lost their stream entry: queued for longer than the grace
-- period, or stuck in sending past the visibility timeout.
SELECT id, tenant_id, account_id FROM messages
WHERE (status = 'queued' AND updated_at < now() - make_interval(secs => %(grace)s))
   OR (status = 'sending' AND claimed_at < now() - make_interval(secs => %(visibility)s))
ORDER BY id

-- name: touch_queued
UPDATE messages SET updated_at = now() WHERE id = ANY(%s) AND status IN ('queued', 'sending')

-- name: defer_recipients
-- Recipients a provider deferred (4xx for them only) get a child message of their own,
-- retried later without re-sending to the recipients that were delivered.
INSERT INTO messages (
    id, parent_id, tenant_id, account_id, mail_from, rcpt_to, subject, header_message_id,
    header_from, header_to, header_cc, size, sha256, storage_key, client_ip, device, status,
    attempts, next_attempt_at, route_override, created_at)
SELECT %(child_id)s, id, tenant_id, account_id, mail_from, %(rcpt_to)s, subject,
       header_message_id, header_from, header_to, header_cc, size, sha256, storage_key,
       client_ip, device, 'retrying', attempts, %(next_attempt_at)s, route_override, created_at
FROM messages WHERE id = %(parent_id)s

-- name: split_message
-- A child row per route group shares the parent's body; the parent becomes final.
INSERT INTO messages (
    id, parent_id, tenant_id, account_id, mail_from, rcpt_to, subject, header_message_id,
    header_from, header_to, header_cc, size, sha256, storage_key, client_ip, device, status,
    route_override, created_at)
SELECT %(child_id)s, id, tenant_id, account_id, mail_from, %(rcpt_to)s, subject,
       header_message_id, header_from, header_to, header_cc, size, sha256, storage_key,
       client_ip, device, 'queued', route_override, created_at
FROM messages WHERE id = %(parent_id)s

-- name: adopt_legacy
-- A legacy stream entry becomes a normal queued message; adopting the same entry twice
-- (a crash in between) writes nothing the second time.
INSERT INTO messages (
    id, tenant_id, account_id, mail_from, rcpt_to, subject, header_message_id, header_from,
    header_to, header_cc, size, sha256, storage_key, status)
SELECT %(id)s, a.tenant_id, a.id, %(mail_from)s, %(rcpt_to)s, %(subject)s, %(header_message_id)s,
       %(header_from)s, %(header_to)s, %(header_cc)s, %(size)s, %(sha256)s, %(storage_key)s,
       'queued'
FROM accounts a WHERE a.id = %(account_id)s
ON CONFLICT (id) DO NOTHING

-- name: account_id_by_username
SELECT id FROM accounts WHERE username = %s

-- name: quota_month_count
-- A tenant's accepted messages this calendar month (UTC), to rebuild its quota counter.
SELECT count(*) FROM messages
WHERE tenant_id = %s
  AND created_at >= date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
  AND status <> 'enqueue_failed' AND parent_id IS NULL
