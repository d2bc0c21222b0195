-- smtpproxy schema, version 1: tenants, accounts, providers, routing rules, messages,
-- delivery logs. Applied by `smtpproxy db migrate` inside one transaction.

CREATE TABLE tenants (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    monthly_limit bigint CHECK (monthly_limit IS NULL OR monthly_limit >= 0),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE accounts (
    id              bigserial PRIMARY KEY,
    tenant_id       bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    username        text NOT NULL UNIQUE CHECK (length(username) BETWEEN 1 AND 255),
    password_hash   text NOT NULL,
    allowed_domains text[] NOT NULL DEFAULT '{}',
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX accounts_tenant ON accounts (tenant_id);

CREATE TABLE providers (
    id         bigserial PRIMARY KEY,
    tenant_id  bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    name       text NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    type       text NOT NULL,
    endpoint   text,
    settings   jsonb NOT NULL DEFAULT '{}',
    -- Fernet token of the provider's secret (API key, password); never plain text
    secret     bytea,
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);

CREATE TABLE routing_rules (
    id               bigserial PRIMARY KEY,
    tenant_id        bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    priority         integer NOT NULL,
    sender_domain    text,      -- glob such as *.example.com; NULL matches any
    recipient_domain text,      -- glob; NULL matches any
    account_id       bigint REFERENCES accounts (id) ON DELETE CASCADE,
    provider_id      bigint NOT NULL REFERENCES providers (id) ON DELETE RESTRICT,
    fallback_ids     bigint[] NOT NULL DEFAULT '{}',
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX routing_rules_tenant ON routing_rules (tenant_id, priority);

CREATE TABLE messages (
    id                  text PRIMARY KEY,
    parent_id           text REFERENCES messages (id) ON DELETE CASCADE,
    tenant_id           bigint NOT NULL REFERENCES tenants (id) ON DELETE RESTRICT,
    account_id          bigint NOT NULL REFERENCES accounts (id) ON DELETE RESTRICT,
    mail_from           text NOT NULL,
    rcpt_to             text[] NOT NULL,
    subject             text NOT NULL DEFAULT '',
    header_message_id   text NOT NULL DEFAULT '',
    header_from         text NOT NULL DEFAULT '',
    header_to           text NOT NULL DEFAULT '',
    header_cc           text NOT NULL DEFAULT '',
    size                integer NOT NULL,
    sha256              text NOT NULL,
    storage_key         text NOT NULL,
    client_ip           text NOT NULL DEFAULT '',
    status              text NOT NULL CHECK (status IN (
                            'queued', 'sending', 'retrying', 'delivered', 'failed',
                            'dlq', 'enqueue_failed', 'storage_error', 'split')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz,
    claimed_by          text,
    claimed_at          timestamptz,
    provider_name       text,
    provider_message_id text,
    last_error          text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    finished_at         timestamptz
);
-- the scheduler and the reconciler look only at live rows
CREATE INDEX messages_live ON messages (status, next_attempt_at)
    WHERE status IN ('queued', 'retrying', 'sending');
CREATE INDEX messages_tenant_created ON messages (tenant_id, created_at);
CREATE INDEX messages_account_created ON messages (account_id, created_at);
CREATE INDEX messages_header_message_id ON messages (header_message_id)
    WHERE header_message_id <> '';
CREATE INDEX messages_storage_key ON messages (storage_key);
CREATE INDEX messages_parent ON messages (parent_id) WHERE parent_id IS NOT NULL;

CREATE TABLE delivery_logs (
    id                  bigserial PRIMARY KEY,
    message_id          text NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    account_id          bigint NOT NULL,
    tenant_id           bigint NOT NULL,
    provider_name       text NOT NULL DEFAULT '',
    status              text NOT NULL,
    error_message       text NOT NULL DEFAULT '',
    attempt_number      integer NOT NULL,
    duration_ms         integer NOT NULL DEFAULT 0,
    provider_message_id text,
    recipients          text[] NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX delivery_logs_account_created ON delivery_logs (account_id, created_at);
CREATE INDEX delivery_logs_tenant_created ON delivery_logs (tenant_id, created_at);
CREATE INDEX delivery_logs_provider_status ON delivery_logs (provider_name, status);
CREATE INDEX delivery_logs_message ON delivery_logs (message_id);
CREATE INDEX delivery_logs_created ON delivery_logs (created_at);
