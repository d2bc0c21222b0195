-- Version 7: a replayed dead letter gets a fresh delivery.max_age.
--
-- `smtpproxy dlq retry` sets replayed_at; the retry policy counts a message's age from
-- it (or from created_at, for a message never replayed), so a replayed message older
-- than max_age is not dead-lettered again after a single attempt.
ALTER TABLE messages ADD COLUMN replayed_at timestamptz;

-- Roles that may replay dead letters (they update messages.status: the operator role
-- of `smtpproxy db grant`, whatever its prefix) may set the new column too.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT DISTINCT grantee FROM information_schema.column_privileges
        WHERE table_schema = current_schema() AND table_name = 'messages'
          AND column_name = 'status' AND privilege_type = 'UPDATE'
          AND grantee <> current_user
    LOOP
        EXECUTE format('GRANT UPDATE (replayed_at) ON messages TO %I', r.grantee);
    END LOOP;
END
$$;
