-- Version 5: an index for `smtpproxy queue status`.

-- dead letters per tenant (dlq, failed, storage_error) are counted from this small index
-- alone (an index-only scan) instead of a scan of every message
CREATE INDEX messages_dead ON messages (tenant_id, status)
    WHERE status IN ('dlq', 'failed', 'storage_error');
