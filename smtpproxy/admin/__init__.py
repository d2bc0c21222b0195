"""Administrative operations: what the operator CLI does to tenants, accounts, providers,
routing rules, devices and database roles, one module per subject.

Each function takes an open connection and runs inside the caller's transaction (in a
savepoint of its own), so a CLI command either writes everything or nothing. Mistakes
become NotFoundError or ConflictError with one line naming what is wrong; secrets arrive
already hashed or encrypted and never leave as plain text.

Every change also, in the same transaction:
- appends an audit_log row (smtpproxy.admin.audit.record) with secrets masked and without
  password hashes, and
- sends `NOTIFY smtpproxy_config, '<kind>'` (kind: tenant, account, provider, route), so
  running instances reload their configuration as soon as the change commits.

Deleting follows one rule: nothing is deleted that something else still needs.
- A tenant is deleted only when it has no accounts, providers, routes or messages left.
- An account is never deleted while it has live (queued, retrying, sending) messages,
  or while a device sends as it (admin.devices).
  Its finished messages are kept too unless the caller asks for with_history, which
  deletes them with their delivery logs (their bodies become orphans that
  `fsck-storage` removes). Routing rules limited to the account go with it.
- A provider is deleted only when no routing rule uses it, as provider or fallback, and
  no live message was sent to it with `dlq retry --to-provider`.
Destructive functions take a `confirm(description)` callback, called after every check
has passed and before anything is deleted; it raises to cancel.

This package owns the SQL of those operations and their rules; it must not print,
prompt or parse command lines (that is smtpproxy.cli), and it never runs inside the
relay's data path. The functions are re-exported here: `admin.add_tenant(conn, ...)`.
"""

from __future__ import annotations

from smtpproxy.admin.accounts import (
    account,
    account_devices,
    account_messages,
    add_account,
    delete_account,
    list_accounts,
    normalise_domains,
    normalise_rate,
    set_account_status,
    set_password,
    update_account,
)
from smtpproxy.admin.audit_trail import audit_entries
from smtpproxy.admin.common import (
    CHANNEL,
    UNSET,
    Confirm,
    PermissionDenied,
    Row,
    Unset,
    permission_denied,
)
from smtpproxy.admin.providers import (
    add_provider,
    delete_provider,
    list_providers,
    parse_settings,
    provider,
    provider_rules,
    provider_spec,
    set_provider_enabled,
    update_provider,
)
from smtpproxy.admin.roles import (
    DEFAULT_ROLE_PREFIX,
    ROLES,
    grant_role,
    require_owner,
    revoke_role,
    role_admin_denied,
    role_name,
    setup_roles,
)
from smtpproxy.admin.routes import (
    ROUTE_FIELDS,
    add_route,
    delete_route,
    list_routes,
    move_route,
    route,
)
from smtpproxy.admin.tenants import (
    add_tenant,
    delete_tenant,
    list_tenants,
    normalise_networks,
    set_tenant_status,
    tenant,
    tenant_dependents,
    update_tenant,
)
from smtpproxy.db.pool import Conn

__all__ = [
    "CHANNEL",
    "DEFAULT_ROLE_PREFIX",
    "ROLES",
    "ROUTE_FIELDS",
    "UNSET",
    "Confirm",
    "Conn",
    "PermissionDenied",
    "Row",
    "Unset",
    "account",
    "account_devices",
    "account_messages",
    "add_account",
    "add_provider",
    "add_route",
    "add_tenant",
    "audit_entries",
    "delete_account",
    "delete_provider",
    "delete_route",
    "delete_tenant",
    "grant_role",
    "list_accounts",
    "list_providers",
    "list_routes",
    "list_tenants",
    "move_route",
    "normalise_domains",
    "normalise_networks",
    "normalise_rate",
    "parse_settings",
    "permission_denied",
    "provider",
    "provider_rules",
    "provider_spec",
    "require_owner",
    "revoke_role",
    "role_admin_denied",
    "role_name",
    "route",
    "set_account_status",
    "set_password",
    "set_provider_enabled",
    "set_tenant_status",
    "setup_roles",
    "tenant",
    "tenant_dependents",
    "update_account",
    "update_provider",
    "update_tenant",
]
