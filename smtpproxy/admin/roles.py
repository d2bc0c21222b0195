"""Database roles for operators (viewer, operator, admin): set up, grant, revoke, and
the checks that a connected role may do what it asks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import LiteralString

import psycopg
from psycopg import sql

from smtpproxy.admin import audit
from smtpproxy.admin.common import (
    PermissionDenied,
)
from smtpproxy.db.pool import Conn
from smtpproxy.errors import NotFoundError, UsageError

ROLES = ("viewer", "operator", "admin")
DEFAULT_ROLE_PREFIX = "smtpproxy"

# what a viewer may not read, even though it may read the rest of the table
_HIDDEN_COLUMNS = {"accounts": ("password_hash",), "providers": ("secret",)}
_VIEWER_TABLES = (
    "tenants",
    "accounts",
    "providers",
    "routing_rules",
    "devices",
    "messages",
    "delivery_logs",
    "audit_log",
    "schema_migrations",
)
_OPERATOR_MANAGES = ("accounts", "providers", "routing_rules", "devices")
# the columns a dead-letter replay changes
_MESSAGE_STATUS_COLUMNS = (
    "status",
    "attempts",
    "next_attempt_at",
    "claimed_by",
    "claimed_at",
    "last_error",
    "route_override",
    "replayed_at",
    "provider_name",
    "provider_message_id",
    "updated_at",
    "finished_at",
)


def role_name(role: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    if role not in ROLES:
        raise UsageError(f"--role {role!r}: expected one of {', '.join(ROLES)}")
    if not prefix or not all(c.isalnum() or c == "_" for c in prefix) or len(prefix) > 40:
        raise UsageError(f"--role-prefix {prefix!r}: expected letters, digits and '_'")
    return f"{prefix}_{role}"


def _role_exists(conn: Conn, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


def _columns(conn: Conn, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass"
        " AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _grant_columns(
    conn: Conn, privilege: LiteralString, table: str, columns: Sequence[str], to: str
) -> None:
    conn.execute(
        sql.SQL("GRANT {} ({}) ON {} TO {}").format(
            sql.SQL(privilege),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.Identifier(table),
            sql.Identifier(to),
        )
    )


def setup_roles(conn: Conn, prefix: str = DEFAULT_ROLE_PREFIX) -> dict[str, str]:
    """Create the three NOLOGIN group roles when missing and set their privileges on this
    database to exactly what they should be (safe to repeat; repeat after migrations).

    viewer:   reads tenants, accounts (not password hashes), providers (not secrets),
              routing rules, devices, messages, delivery logs and the audit log
    operator: viewer, plus manages accounts, providers, routes and devices, reads
              provider secrets (for `provider test`), updates message status columns
              (dead-letter replay) and writes audit rows
    admin:    operator, plus everything on every table (tenants, deleting history, ...)
              and CREATE on the schema
    """
    names = {role: role_name(role, prefix) for role in ROLES}
    ident = {role: sql.Identifier(name) for role, name in names.items()}
    require_owner(conn, "grant roles")
    for name in names.values():
        if not _role_exists(conn, name):
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
            except psycopg.errors.DuplicateObject:
                pass  # created by a concurrent `db grant`
    row = conn.execute("SELECT current_database(), current_schema()").fetchone()
    assert row is not None
    database, schema = sql.Identifier(str(row[0])), sql.Identifier(str(row[1]))
    # start from nothing, so repeating this converges on exactly the privileges below
    for role in ROLES:
        conn.execute(
            sql.SQL("REVOKE ALL ON ALL TABLES IN SCHEMA {} FROM {}").format(schema, ident[role])
        )
        conn.execute(
            sql.SQL("REVOKE ALL ON ALL SEQUENCES IN SCHEMA {} FROM {}").format(schema, ident[role])
        )
    conn.execute(sql.SQL("GRANT {} TO {}").format(ident["viewer"], ident["operator"]))
    conn.execute(sql.SQL("GRANT {} TO {}").format(ident["operator"], ident["admin"]))
    conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, ident["viewer"]))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(schema, ident["viewer"]))

    for table in _VIEWER_TABLES:
        hidden = _HIDDEN_COLUMNS.get(table)
        if hidden:
            visible = [c for c in _columns(conn, table) if c not in hidden]
            _grant_columns(conn, "SELECT", table, visible, names["viewer"])
        else:
            conn.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(table), ident["viewer"])
            )

    for table in _OPERATOR_MANAGES:
        conn.execute(
            sql.SQL("GRANT INSERT, UPDATE, DELETE ON {} TO {}").format(
                sql.Identifier(table), ident["operator"]
            )
        )
    _grant_columns(conn, "SELECT", "providers", ["secret"], names["operator"])
    _grant_columns(conn, "UPDATE", "messages", _MESSAGE_STATUS_COLUMNS, names["operator"])
    conn.execute(sql.SQL("GRANT INSERT ON audit_log TO {}").format(ident["operator"]))
    for table in (*_OPERATOR_MANAGES, "audit_log"):
        seq = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = pg_get_serial_sequence(%s, 'id')::regclass",
            (table,),
        ).fetchone()
        if seq is not None:
            conn.execute(
                sql.SQL("GRANT USAGE ON SEQUENCE {} TO {}").format(
                    sql.Identifier(str(seq[0]), str(seq[1])), ident["operator"]
                )
            )

    conn.execute(
        sql.SQL("GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA {} TO {}").format(
            schema, ident["admin"]
        )
    )
    conn.execute(
        sql.SQL("GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            schema, ident["admin"]
        )
    )
    conn.execute(sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(schema, ident["admin"]))
    conn.execute(sql.SQL("GRANT TEMPORARY ON DATABASE {} TO {}").format(database, ident["admin"]))
    return names


def role_admin_denied(doing: str) -> PermissionDenied:
    return PermissionDenied(
        f"permission denied: your database role cannot {doing}; run it as the owner of "
        "smtpproxy's tables (with CREATEROLE) or as a superuser"
    )


def require_owner(conn: Conn, doing: str) -> None:
    """Only the owner of the tables may change privileges on them: anyone else would get
    mere warnings from GRANT and REVOKE."""
    owner = conn.execute(
        "SELECT pg_has_role(current_user, relowner, 'USAGE') FROM pg_class"
        " WHERE oid = 'tenants'::regclass"
    ).fetchone()
    if not owner or not owner[0]:
        raise role_admin_denied(doing)


def _check_user(conn: Conn, user: str, prefix: str) -> None:
    if not _role_exists(conn, user):
        raise NotFoundError(
            f"no database role named {user!r}: create it first, for example in psql as a "
            f"superuser: CREATE ROLE \"{user}\" LOGIN PASSWORD '...'; then run this again"
        )
    if user in {role_name(r, prefix) for r in ROLES}:
        raise UsageError(f"{user!r} is one of smtpproxy's group roles, not a user")


def grant_role(conn: Conn, role: str, user: str, prefix: str = DEFAULT_ROLE_PREFIX) -> str:
    """Set up the roles (setup_roles), then make user a member of the chosen one."""
    group = role_name(role, prefix)
    with conn.transaction():
        _check_user(conn, user, prefix)
        setup_roles(conn, prefix)
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(user)))
        audit.record(conn, "db.grant", user, after={"role": group})
    return group


def revoke_role(conn: Conn, role: str, user: str, prefix: str = DEFAULT_ROLE_PREFIX) -> bool:
    """End user's membership of the chosen role; False when it was not a member."""
    group = role_name(role, prefix)
    with conn.transaction():
        require_owner(conn, "revoke roles")
        _check_user(conn, user, prefix)
        member = conn.execute(
            "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
            " JOIN pg_roles u ON u.oid = m.member WHERE g.rolname = %s AND u.rolname = %s",
            (group, user),
        ).fetchone()
        if member is None:
            return False
        conn.execute(
            sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(user))
        )
        audit.record(conn, "db.revoke", user, before={"role": group})
    return True
