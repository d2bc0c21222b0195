-- Statements behind `smtpproxy device` and the device table ingress loads.

-- name: load_devices
SELECT d.name AS device, d.network::text AS network,
       a.id, a.tenant_id, a.username, a.allowed_domains, a.rate_limit,
       t.name AS tenant_name, t.monthly_limit, t.allowed_networks::text[] AS allowed_networks
FROM devices d
JOIN accounts a ON a.id = d.account_id
JOIN tenants t ON t.id = a.tenant_id
WHERE d.enabled AND a.status = 'active' AND t.status = 'active'

-- name: device_insert
INSERT INTO devices (name, network, account_id, note) VALUES (%s, %s::cidr, %s, %s)
RETURNING id

-- name: device_list
SELECT d.id, d.name, d.network::text AS network, a.username AS account, t.name AS tenant,
       d.enabled, d.note, d.created_at
FROM devices d JOIN accounts a ON a.id = d.account_id JOIN tenants t ON t.id = a.tenant_id
ORDER BY d.name

-- name: device_lock
SELECT d.id, d.name, d.network::text AS network, a.username AS account, t.name AS tenant,
       d.enabled, d.note, d.created_at
FROM devices d JOIN accounts a ON a.id = d.account_id JOIN tenants t ON t.id = a.tenant_id
WHERE d.name = %s
FOR UPDATE OF d

-- name: device_overlapping
SELECT name, network::text AS network FROM devices WHERE network && %s::cidr
ORDER BY network LIMIT 1

-- name: device_set_enabled
UPDATE devices SET enabled = %s, updated_at = now() WHERE id = %s

-- name: device_delete
DELETE FROM devices WHERE id = %s

-- name: account_devices
SELECT name FROM devices WHERE account_id = %s ORDER BY name

-- name: device_by_name
SELECT d.id, d.name, d.network::text AS network, a.username AS account, t.name AS tenant,
       d.enabled, d.note, d.created_at
FROM devices d JOIN accounts a ON a.id = d.account_id JOIN tenants t ON t.id = a.tenant_id
WHERE d.name = %s

-- name: tenant_network_admits
SELECT %s::cidr <<= ANY (allowed_networks) FROM tenants WHERE id = %s
