-- Statements the running service uses to load routing rules, providers and accounts.

-- name: load_rules
SELECT r.id, r.tenant_id, r.priority, p.name AS provider, r.sender_domain,
       r.recipient_domain, r.account_id,
       ARRAY(SELECT fp.name FROM unnest(r.fallback_ids) WITH ORDINALITY AS f(pid, n)
             JOIN providers fp ON fp.id = f.pid ORDER BY f.n) AS fallbacks,
       r.enabled
FROM routing_rules r JOIN providers p ON p.id = r.provider_id
ORDER BY r.tenant_id, r.priority, r.id

-- name: load_providers
SELECT id, tenant_id, name, type, endpoint, settings, secret, enabled FROM providers

-- name: account_for_login
SELECT a.id, a.tenant_id, a.username, a.password_hash, a.allowed_domains, a.status,
       a.rate_limit, t.name AS tenant_name, t.status AS tenant_status, t.monthly_limit,
       t.allowed_networks::text[] AS allowed_networks
FROM accounts a JOIN tenants t ON t.id = a.tenant_id
WHERE a.username = %s
