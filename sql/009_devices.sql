-- Version 9: devices that cannot log in (printers, scanners, SMTP-only applications).
--
-- A client on an smtp.device_listen listener whose address is inside an enabled
-- device's network may send without AUTH, as the device's account. `smtpproxy device`
-- manages the rows.
CREATE TABLE devices (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    network    cidr NOT NULL,
    -- the account its mail is sent as; an account is not deleted while a device uses it
    account_id bigint NOT NULL REFERENCES accounts (id) ON DELETE RESTRICT,
    enabled    boolean NOT NULL DEFAULT true,
    note       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    -- an address belongs to one device at most, whichever instance adds them, at once
    CONSTRAINT devices_networks_overlap EXCLUDE USING gist (network inet_ops WITH &&)
);
CREATE INDEX devices_account ON devices (account_id);
