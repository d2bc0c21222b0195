-- Version 2: body retention and the storage consistency checker.

-- when the body of a finished message was removed from the store (retention)
ALTER TABLE messages ADD COLUMN body_deleted_at timestamptz;

-- retention finds finished messages whose body is still stored, oldest first
CREATE INDEX messages_finished_with_body ON messages (finished_at)
    WHERE body_deleted_at IS NULL AND finished_at IS NOT NULL;

-- enqueue_failed rows are cleaned up by the checker after a grace period
CREATE INDEX messages_enqueue_failed ON messages (updated_at)
    WHERE status = 'enqueue_failed';

-- metadata retention walks finished messages by age
CREATE INDEX messages_finished_at ON messages (finished_at) WHERE finished_at IS NOT NULL;
