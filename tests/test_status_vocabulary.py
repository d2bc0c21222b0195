"""One status vocabulary: `smtpproxy.models` is the only place a set of message statuses is
spelled, and every status change the SQL makes is one `models.TRANSITIONS` allows.

The SQL is read as text: every `UPDATE messages ... SET status = '<new>'` names the
statuses it moves from in its WHERE clause (`status = 'x'`, `status IN (...)`), and
each (old, new) pair must be in the table. A statement that sets a status from a
parameter (`finish_claims`) is checked on the Python side: `records.Finish` refuses a
status the table does not allow after `sending`.
"""

from __future__ import annotations

import ast
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from smtpproxy.db.queries import parse
from smtpproxy.delivery.records import Claimed, Finish
from smtpproxy.models import TRANSITIONS, Status

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "smtpproxy"
MESSAGE_STATUSES = frozenset(s.value for s in Status)
# the other columns called status, and what they hold
OTHER_VOCABULARIES = (
    frozenset({"active", "suspended"}),  # tenants
    frozenset({"active", "disabled"}),  # accounts
    MESSAGE_STATUSES | {"failover"},  # delivery_logs
)

_SET = re.compile(r"\bSET\s+status\s*=\s*(?:'(?P<literal>\w+)'|(?P<expr>[\w.%()]+))", re.I)
_WHERE_ONE = re.compile(r"\b(?:\w+\.)?status\s*=\s*'(\w+)'", re.I)
_WHERE_IN = re.compile(r"\b(?:\w+\.)?status\s+IN\s*\(([^)]*)\)", re.I)
_WHERE_NEGATED = re.compile(r"\b(?:\w+\.)?status\s*(?:<>|!=|NOT\s+IN)", re.I)
_LITERAL = re.compile(r"'(\w+)'")


def sql_statements() -> dict[str, str]:
    """Every SQL statement of the package and the migrations, by a readable name."""
    out: dict[str, str] = {}
    for path in sorted((PACKAGE / "db" / "sql").glob("*.sql")):
        for name, text in parse(path.read_text()).items():
            out[f"{path.name}:{name}"] = _strip_comments(text)
    for path in sorted((ROOT / "sql").glob("*.sql")):
        for i, text in enumerate(_strip_comments(path.read_text()).split(";")):
            if text.strip():
                out[f"{path.name}#{i}"] = text
    return out


def _strip_comments(text: str) -> str:
    return re.sub(r"--[^\n]*", "", text)


def status_moves(statement: str) -> tuple[str | None, set[str]] | None:
    """For an UPDATE of messages that sets status: (the new status or None when it comes
    from a parameter, the statuses the WHERE clause lets it move from). None for any
    other statement."""
    update = re.search(r"\bUPDATE\s+messages\b", statement, re.I)
    if update is None:
        return None
    body = statement[update.start() :]
    body = re.split(r"\bRETURNING\b", body, maxsplit=1, flags=re.I)[0]
    assignment = _SET.search(body)
    if assignment is None:
        return None
    rest = body[assignment.end() :]
    if _WHERE_NEGATED.search(rest):
        raise AssertionError(f"a status change must name the statuses it moves from: {body}")
    sources = set(_WHERE_ONE.findall(rest))
    for group in _WHERE_IN.findall(rest):
        sources |= set(_LITERAL.findall(group))
    return assignment.group("literal"), sources


def transition_errors(statements: dict[str, str]) -> list[str]:
    """Every status change in the statements that TRANSITIONS does not allow."""
    errors = []
    for name, text in statements.items():
        moves = status_moves(text)
        if moves is None:
            continue
        new, sources = moves
        if not sources:
            errors.append(f"{name}: sets status without saying from which")
        for old in sorted(sources):
            if old not in MESSAGE_STATUSES or (new is not None and new not in MESSAGE_STATUSES):
                errors.append(f"{name}: unknown status in {old} -> {new}")
            elif new is not None and old != new and Status(new) not in TRANSITIONS[Status(old)]:
                errors.append(f"{name}: {old} -> {new} is not in models.TRANSITIONS")
    return errors


def test_every_status_change_in_the_sql_is_an_allowed_transition() -> None:
    statements = sql_statements()
    changes = [n for n, t in statements.items() if status_moves(t) is not None]
    # the claim, the scheduler, the record, the dead-letter replay, fsck, enqueue failure
    assert len(changes) >= 6, changes
    assert transition_errors(statements) == []


def test_a_transition_broken_by_hand_is_caught() -> None:
    statements = sql_statements()
    replay = statements["dlq.sql:dlq_requeue"]
    broken = replay.replace("SET status = 'queued'", "SET status = 'sending'")
    assert broken != replay
    errors = transition_errors({"dlq.sql:dlq_requeue": broken})
    assert errors == [
        "dlq.sql:dlq_requeue: dlq -> sending is not in models.TRANSITIONS",
        "dlq.sql:dlq_requeue: failed -> sending is not in models.TRANSITIONS",
    ]
    widened = replay.replace("status IN ('dlq', 'failed')", "status IN ('dlq', 'delivered')")
    assert transition_errors({"r": widened}) == [
        "r: delivered -> queued is not in models.TRANSITIONS"
    ]


def test_a_status_change_from_a_parameter_moves_only_from_sending() -> None:
    finish = status_moves(sql_statements()["messages.sql:finish_claims"])
    assert finish == (None, {"sending"})


@pytest.mark.parametrize("status", list(Status))
def test_a_claim_ends_only_in_a_status_allowed_after_sending(status: Status) -> None:
    msg = Claimed("m1", 1, 1, "a@example.org", ("b@example.org",), "k", 1, datetime.now(UTC))
    if status in TRANSITIONS[Status.SENDING]:
        assert Finish(msg, status).status is status
    else:
        with pytest.raises(ValueError, match=f"cannot end in status {status.value}"):
            Finish(msg, status)


def test_every_status_literal_in_the_sql_is_known() -> None:
    for name, text in sql_statements().items():
        groups = [set(_LITERAL.findall(g)) for g in _WHERE_IN.findall(text)]
        groups += [{v} for v in _WHERE_ONE.findall(text)]
        for group in groups:
            assert any(group <= vocabulary for vocabulary in OTHER_VOCABULARIES), (name, group)


def test_the_check_constraint_is_the_enum() -> None:
    initial = (ROOT / "sql" / "001_initial.sql").read_text()
    table = initial[initial.index("CREATE TABLE messages") :]
    check = re.search(r"status\s+text NOT NULL CHECK \(status IN \(([^)]*)\)\)", table)
    assert check is not None
    assert set(_LITERAL.findall(check.group(1))) == MESSAGE_STATUSES
    later = " ".join(p.read_text() for p in sorted((ROOT / "sql").glob("*.sql"))[1:])
    assert "messages_status_check" not in later  # no migration redefines it


def _status_collections(tree: ast.AST) -> list[tuple[int, set[str]]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            strings = {v for v in items if isinstance(v, str)}
            whole = len(node.elts) >= 2 and len(strings) == len(node.elts)
            if whole and strings <= MESSAGE_STATUSES:
                found.append((node.lineno, strings))
    return found


@pytest.mark.parametrize(
    "path",
    [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "models.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_module_but_models_spells_a_set_of_statuses(path: Path) -> None:
    found = _status_collections(ast.parse(path.read_text()))
    assert found == [], f"use the sets in smtpproxy.models: {found}"
