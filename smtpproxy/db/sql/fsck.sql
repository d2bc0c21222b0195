-- Statements of the storage consistency checker (smtpproxy/fsck.py) and of retention.

-- name: fsck_live_page
-- Live messages in id order (keyset pagination: constant memory on millions of rows).
SELECT id, storage_key, status FROM messages
WHERE status IN ('queued', 'retrying', 'sending') AND id > %(after)s
ORDER BY id LIMIT %(limit)s

-- name: fsck_known_keys
SELECT DISTINCT storage_key FROM messages WHERE storage_key = ANY(%s)

-- name: fsck_mark_storage_error
-- Only while the message is still live and not being sent right now (a claim younger
-- than the visibility timeout belongs to a consumer that will find the body missing).
UPDATE messages
SET status = 'storage_error', last_error = %(reason)s, updated_at = now(), finished_at = now(),
    claimed_by = NULL, claimed_at = NULL
WHERE id = %(id)s
  AND (status IN ('queued', 'retrying')
       OR (status = 'sending' AND claimed_at < now() - make_interval(secs => %(visibility)s)))
RETURNING id, tenant_id, account_id, attempts, rcpt_to

-- name: fsck_enqueue_failed_page
SELECT id, storage_key FROM messages
WHERE status = 'enqueue_failed' AND updated_at < now() - make_interval(secs => %(grace)s)
  AND id > %(after)s
ORDER BY id LIMIT %(limit)s

-- name: fsck_delete_enqueue_failed
DELETE FROM messages WHERE id = %s AND status = 'enqueue_failed' RETURNING storage_key

-- name: fsck_key_still_used
-- Another row (a split child, a live message) still needs this body.
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE storage_key = %(key)s AND id <> %(id)s AND body_deleted_at IS NULL
      AND status <> 'enqueue_failed')

-- name: fsck_create_stream_table
CREATE TEMP TABLE fsck_on_stream (id text) ON COMMIT DROP

-- name: fsck_copy_stream
COPY fsck_on_stream (id) FROM STDIN

-- name: fsck_stream_candidates_exist
-- Cheap test before any stream scan: is any live row old enough to have lost its entry?
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE (status = 'queued' AND updated_at < now() - make_interval(secs => %(grace)s))
       OR (status = 'retrying' AND next_attempt_at < now() - make_interval(secs => %(grace)s))
       OR (status = 'sending' AND claimed_at < now() - make_interval(secs => %(visibility)s)))

-- name: fsck_missing_from_stream
-- Live rows that should be on the stream (queued, due for a while, or claimed by a
-- consumer that died) and are neither on it nor in any consumer's pending list.
SELECT m.id, m.tenant_id, m.account_id, m.status FROM messages m
WHERE ((m.status = 'queued' AND m.updated_at < now() - make_interval(secs => %(grace)s))
    OR (m.status = 'retrying' AND m.next_attempt_at < now() - make_interval(secs => %(grace)s))
    OR (m.status = 'sending' AND m.claimed_at < now() - make_interval(secs => %(visibility)s)))
  AND NOT EXISTS (SELECT 1 FROM fsck_on_stream s WHERE s.id = m.id)
ORDER BY m.id

-- name: fsck_touch
UPDATE messages SET updated_at = now() WHERE id = ANY(%s) AND status IN ('queued', 'retrying', 'sending')

-- name: fsck_verify_page
SELECT id, storage_key, size, sha256, status FROM messages
WHERE body_deleted_at IS NULL AND status NOT IN ('enqueue_failed', 'storage_error')
  AND id > %(after)s
ORDER BY id LIMIT %(limit)s

-- name: retention_expired_bodies
-- Finished messages past the body retention whose body no unexpired row still needs.
SELECT m.id, m.storage_key FROM messages m
WHERE m.body_deleted_at IS NULL AND m.finished_at < now() - make_interval(days => %(days)s)
  AND NOT EXISTS (
      SELECT 1 FROM messages o
      WHERE o.storage_key = m.storage_key AND o.body_deleted_at IS NULL
        AND (o.finished_at IS NULL OR o.finished_at >= now() - make_interval(days => %(days)s)))
ORDER BY m.finished_at LIMIT %(limit)s

-- name: retention_expired_count
SELECT count(DISTINCT m.storage_key) FROM messages m
WHERE m.body_deleted_at IS NULL AND m.finished_at < now() - make_interval(days => %(days)s)
  AND NOT EXISTS (
      SELECT 1 FROM messages o
      WHERE o.storage_key = m.storage_key AND o.body_deleted_at IS NULL
        AND (o.finished_at IS NULL OR o.finished_at >= now() - make_interval(days => %(days)s)))

-- name: retention_mark_body_deleted
UPDATE messages SET body_deleted_at = now() WHERE storage_key = ANY(%s) AND body_deleted_at IS NULL

-- name: retention_delete_messages
-- Finished messages (and, by cascade, their delivery logs) past the metadata retention.
DELETE FROM messages WHERE id IN (
    SELECT id FROM messages
    WHERE finished_at < now() - make_interval(days => %(days)s)
      AND NOT EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = messages.id)
    LIMIT %(limit)s)

-- name: retention_delete_logs
DELETE FROM delivery_logs WHERE id IN (
    SELECT id FROM delivery_logs
    WHERE created_at < now() - make_interval(days => %(days)s) LIMIT %(limit)s)
