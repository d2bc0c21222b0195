-- Version 6: limits enforced at SMTP time.

-- an account's sending rate, as 'N/s', 'N/m' or 'N/h' (NULL: unlimited)
ALTER TABLE accounts ADD COLUMN rate_limit text
    CHECK (rate_limit IS NULL OR rate_limit ~ '^[1-9][0-9]{0,8}/[smh]$');

-- networks a tenant's accounts may log in from (empty: anywhere)
ALTER TABLE tenants ADD COLUMN allowed_networks cidr[] NOT NULL DEFAULT '{}';
