-- Version 8: the duplicate-submission lookup probes one index entry per message.
--
-- The lookup matches account, header Message-ID and body hash exactly. Indexed as
-- (account_id, header_message_id, created_at), the planner could not tell it from
-- messages_account_created (account_id, created_at) and, on a fresh or busy table,
-- walked every recent message of the account for each new one: ingest slowed as the
-- table grew (60 ms per batch of 20 at 20,000 messages). With all three equality
-- columns in the index, every plan is one probe per incoming message.
DROP INDEX messages_duplicates;
CREATE INDEX messages_duplicates ON messages (account_id, header_message_id, sha256)
    WHERE header_message_id <> '';
