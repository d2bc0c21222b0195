-- Statements behind the administrative CLI (tenant, account, provider, route).

-- name: tenant_insert
INSERT INTO tenants (name, monthly_limit) VALUES (%s, %s) RETURNING id

-- name: tenant_by_name
SELECT id, name, status, monthly_limit, created_at FROM tenants WHERE name = %s

-- name: tenant_list
SELECT t.id, t.name, t.status, t.monthly_limit, t.created_at,
       (SELECT count(*) FROM accounts a WHERE a.tenant_id = t.id) AS accounts,
       (SELECT count(*) FROM providers p WHERE p.tenant_id = t.id) AS providers,
       (SELECT count(*) FROM routing_rules r WHERE r.tenant_id = t.id) AS routes
FROM tenants t ORDER BY t.name

-- name: account_insert
INSERT INTO accounts (tenant_id, username, password_hash, allowed_domains)
VALUES (%s, %s, %s, %s) RETURNING id

-- name: account_list
SELECT a.id, a.username, t.name AS tenant, a.status, a.allowed_domains, a.created_at
FROM accounts a JOIN tenants t ON t.id = a.tenant_id
WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
ORDER BY t.name, a.username

-- name: account_by_username
SELECT a.id, a.username, t.name AS tenant, a.tenant_id, a.status, a.allowed_domains, a.created_at
FROM accounts a JOIN tenants t ON t.id = a.tenant_id WHERE a.username = %s

-- name: provider_insert
INSERT INTO providers (tenant_id, name, type, endpoint, settings, secret)
VALUES (%s, %s, %s, %s, %s, %s) RETURNING id

-- name: provider_list
SELECT p.id, t.name AS tenant, p.name, p.type, p.endpoint, p.settings,
       p.secret IS NOT NULL AS has_secret, p.enabled, p.created_at
FROM providers p JOIN tenants t ON t.id = p.tenant_id
WHERE %(tenant)s::text IS NULL OR t.name = %(tenant)s
ORDER BY t.name, p.name

-- name: provider_by_name
SELECT p.id, t.name AS tenant, p.tenant_id, p.name, p.type, p.endpoint, p.settings,
       p.secret IS NOT NULL AS has_secret, p.enabled, p.created_at
FROM providers p JOIN tenants t ON t.id = p.tenant_id
WHERE t.name = %s AND p.name = %s

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
