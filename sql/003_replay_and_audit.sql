-- Version 3: dead-letter replay, duplicate submissions, and the audit trail.

-- `smtpproxy dlq retry --to-provider NAME` sends a message through NAME, bypassing routing
ALTER TABLE messages ADD COLUMN route_override text;

-- duplicate submissions (a client that lost our 250 and sends again) are found by
-- account, header Message-ID and body hash within smtp.duplicate_window
CREATE INDEX messages_duplicates ON messages (account_id, header_message_id, created_at)
    WHERE header_message_id <> '';

-- every administrative change: who (database role and OS user), what, before and after
CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    db_role  text NOT NULL DEFAULT current_user,
    os_user  text NOT NULL DEFAULT '',
    action   text NOT NULL,
    target   text NOT NULL DEFAULT '',
    before   jsonb,
    after    jsonb
);
CREATE INDEX audit_log_at ON audit_log (at);
