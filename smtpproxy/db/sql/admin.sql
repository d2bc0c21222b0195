-- Statements behind the administrative CLI (tenant, account, provider, route, audit).
--
-- None of them reads accounts.password_hash or providers.secret except the two that
-- must (provider_secret for `provider test`); that keeps every listing within what the
-- viewer role of `smtpproxy db grant` may read.

-- name: notify_config
SELECT pg_notify('smtpproxy_config', %s)

-- tenants ---------------------------------------------------------------------------------

-- name: tenant_insert
INSERT INTO tenants (name, monthly_limit, allowed_networks) VALUES (%s, %s, %s::cidr[])
RETURNING id

-- name: tenant_by_name
SELECT id, name, status, monthly_limit, allowed_networks::text[] AS allowed_networks, created_at
FROM tenants WHERE name = %s

-- name: tenant_lock
SELECT id, name, status, monthly_limit, allowed_networks::text[] AS allowed_networks, created_at
FROM tenants WHERE name = %s FOR UPDATE

-- name: tenant_set_limits
UPDATE tenants SET monthly_limit = %s, allowed_networks = %s::cidr[], updated_at = now()
WHERE id = %s

-- name: tenant_list
SELECT t.id, t.name, t.status, t.monthly_limit, t.created_at,
       (SELECT count(*) FROM accounts a WHERE a.tenant_id = t.id) AS accounts,
       (SELECT count(*) FROM providers p WHERE p.tenant_id = t.id) AS providers,
       (SELECT count(*) FROM routing_rules r WHERE r.tenant_id = t.id) AS routes
FROM tenants t ORDER BY t.name

-- name: tenant_set_status
UPDATE tenants SET status = %s, updated_at = now() WHERE id = %s

-- name: tenant_dependents
SELECT (SELECT count(*) FROM accounts WHERE tenant_id = %(id)s) AS accounts,
       (SELECT count(*) FROM providers WHERE tenant_id = %(id)s) AS providers,
       (SELECT count(*) FROM routing_rules WHERE tenant_id = %(id)s) AS routes,
       (SELECT count(*) FROM messages WHERE tenant_id = %(id)s) AS messages

-- name: tenant_delete
DELETE FROM tenants WHERE id = %s

-- accounts --------------------------------------------------------------------------------

-- name: account_insert
INSERT INTO accounts (tenant_id, username, password_hash, allowed_domains, rate_limit)
VALUES (%s, %s, %s, %s, %s) RETURNING id

-- name: account_list
SELECT a.id, a.username, t.name AS tenant, a.status, a.allowed_domains, a.created_at
FROM accounts a JOIN tenants t ON t.id = a.tenant_id
WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
ORDER BY t.name, a.username

-- name: account_by_username
SELECT a.id, a.username, t.name AS tenant, a.tenant_id, a.status, a.allowed_domains,
       a.rate_limit, a.created_at
FROM accounts a JOIN tenants t ON t.id = a.tenant_id WHERE a.username = %s

-- name: account_lock
SELECT a.id, a.username, t.name AS tenant, a.tenant_id, a.status, a.allowed_domains,
       a.rate_limit, a.created_at
FROM accounts a JOIN tenants t ON t.id = a.tenant_id WHERE a.username = %s
FOR UPDATE OF a

-- name: account_set_limits
UPDATE accounts SET allowed_domains = %s, rate_limit = %s, updated_at = now() WHERE id = %s

-- name: account_set_status
UPDATE accounts SET status = %s, updated_at = now() WHERE id = %s

-- name: account_set_password
UPDATE accounts SET password_hash = %s, updated_at = now() WHERE id = %s

-- name: account_messages
SELECT count(*) FILTER (WHERE status IN ('queued', 'retrying', 'sending')) AS live,
       count(*) FILTER (WHERE status NOT IN ('queued', 'retrying', 'sending')) AS finished
FROM messages WHERE account_id = %s

-- name: account_routes
SELECT id FROM routing_rules WHERE account_id = %s ORDER BY priority, id

-- name: account_delete_history
DELETE FROM messages
WHERE account_id = %s AND status NOT IN ('queued', 'retrying', 'sending')

-- name: account_delete
DELETE FROM accounts WHERE id = %s

-- providers -------------------------------------------------------------------------------

-- name: provider_insert
INSERT INTO providers (tenant_id, name, type, endpoint, settings, secret)
VALUES (%s, %s, %s, %s, %s, %s) RETURNING id

-- name: provider_list
SELECT p.id, t.name AS tenant, p.name, p.type, p.endpoint, p.settings,
       p.has_secret, p.enabled, p.created_at
FROM providers p JOIN tenants t ON t.id = p.tenant_id
WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
ORDER BY t.name, p.name

-- name: provider_by_name
SELECT p.id, t.name AS tenant, p.tenant_id, p.name, p.type, p.endpoint, p.settings,
       p.has_secret, p.enabled, p.created_at
FROM providers p JOIN tenants t ON t.id = p.tenant_id
WHERE t.name = %s AND p.name = %s

-- name: provider_lock
SELECT p.id, t.name AS tenant, p.tenant_id, p.name, p.type, p.endpoint, p.settings,
       p.has_secret, p.enabled, p.created_at
FROM providers p JOIN tenants t ON t.id = p.tenant_id
WHERE t.name = %s AND p.name = %s
FOR UPDATE OF p

-- name: provider_secret
SELECT secret FROM providers WHERE id = %s

-- name: provider_update
UPDATE providers
SET endpoint = %(endpoint)s, settings = %(settings)s,
    secret = coalesce(%(secret)s, secret), updated_at = now()
WHERE id = %(id)s

-- name: provider_set_enabled
UPDATE providers SET enabled = %s, updated_at = now() WHERE id = %s

-- name: provider_rules
SELECT r.id, r.priority, r.provider_id = %(id)s AS as_provider
FROM routing_rules r
WHERE r.provider_id = %(id)s OR %(id)s = ANY (r.fallback_ids)
ORDER BY r.priority, r.id

-- name: provider_live_overrides
SELECT count(*) FROM messages
WHERE tenant_id = %s AND route_override = %s AND status IN ('queued', 'retrying', 'sending')

-- name: provider_delete
DELETE FROM providers WHERE id = %s

-- routes ----------------------------------------------------------------------------------

-- name: route_next_priority
SELECT coalesce(max(priority), 0) + 10 FROM routing_rules WHERE tenant_id = %s

-- name: route_insert
INSERT INTO routing_rules (tenant_id, priority, sender_domain, recipient_domain, account_id,
                           provider_id, fallback_ids)
VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id

-- name: route_list
SELECT r.id, t.name AS tenant, r.priority, r.sender_domain, r.recipient_domain,
       a.username AS account, p.name AS provider,
       ARRAY(SELECT fp.name FROM unnest(r.fallback_ids) WITH ORDINALITY AS f(pid, n)
             JOIN providers fp ON fp.id = f.pid ORDER BY f.n) AS fallbacks,
       r.enabled, r.created_at
FROM routing_rules r
JOIN tenants t ON t.id = r.tenant_id
JOIN providers p ON p.id = r.provider_id
LEFT JOIN accounts a ON a.id = r.account_id
WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
ORDER BY t.name, r.priority, r.id

-- name: route_by_id
SELECT r.id, t.name AS tenant, r.tenant_id, r.priority, r.sender_domain, r.recipient_domain,
       a.username AS account, p.name AS provider,
       ARRAY(SELECT fp.name FROM unnest(r.fallback_ids) WITH ORDINALITY AS f(pid, n)
             JOIN providers fp ON fp.id = f.pid ORDER BY f.n) AS fallbacks,
       r.enabled, r.created_at
FROM routing_rules r
JOIN tenants t ON t.id = r.tenant_id
JOIN providers p ON p.id = r.provider_id
LEFT JOIN accounts a ON a.id = r.account_id
WHERE r.id = %s

-- name: route_lock_tenant
SELECT id, priority FROM routing_rules WHERE tenant_id = %s ORDER BY priority, id FOR UPDATE

-- name: route_set_priority
UPDATE routing_rules SET priority = %s WHERE id = %s

-- name: route_delete
DELETE FROM routing_rules WHERE id = %s

-- audit -----------------------------------------------------------------------------------

-- name: audit_list
SELECT id, at, db_role, os_user, action, target, before, after
FROM audit_log
WHERE (%(since)s::timestamptz IS NULL OR at >= %(since)s)
  AND (%(action)s::text IS NULL OR starts_with(action, %(action)s))
  AND (%(target)s::text IS NULL OR target = %(target)s OR starts_with(target, %(target)s || '/'))
ORDER BY at DESC, id DESC
LIMIT %(limit)s
