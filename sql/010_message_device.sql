-- Version 10: which registered device sent a message (smtp.device_listen, no AUTH).
--
-- The device's name when the message was accepted; NULL for a client that logged in.
-- Kept as text, not a reference: the message's history outlives the device's row (a
-- device renamed or removed later does not rewrite what sent the mail).
ALTER TABLE messages ADD COLUMN device text;
