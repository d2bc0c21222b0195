"""Small pure modules: ids, domains, routing, retry, headers, replies, models, passwords."""

from __future__ import annotations

import email.policy
import re
import time
from collections.abc import Sequence
from typing import Any

import pytest

from smtpproxy import ids
from smtpproxy.config import passwords
from smtpproxy.delivery import mime
from smtpproxy.delivery.retry import Decision, RetryPolicy, decide
from smtpproxy.delivery.routing import RouteGroup, Rule, route, sort_rules
from smtpproxy.ingress import replies
from smtpproxy.ingress.replies import with_enhanced_code
from smtpproxy.mail.domains import GlobError, any_matches, domain_matches, domain_of, validate_glob
from smtpproxy.mail.headers import summarize
from smtpproxy.models import FINAL, TRANSITIONS, HeaderSummary, Outcome, Status, may_transition

# -- ids -------------------------------------------------------------------------------

CROCKFORD = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def test_ids_are_26_crockford_characters() -> None:
    """A new id is 26 characters of Crockford base32 (no I, L, O, U)."""
    for _ in range(50):
        mid = ids.new_message_id()
        assert CROCKFORD.fullmatch(mid)
        assert ids.is_message_id(mid)


def test_ids_sort_by_time() -> None:
    """An id made a millisecond later sorts after one made earlier, whatever the random part."""
    times = [0, 1, 2, 999, 1_000, 1_700_000_000_000, 1_700_000_000_001, 2**50 - 1]
    made = [ids.new_message_id(now_ms=t) for t in times]
    assert sorted(made) == made
    remade = sorted(ids.new_message_id(now_ms=t) for t in reversed(times))
    assert [ids.id_timestamp_ms(m) for m in remade] == times


@pytest.mark.parametrize("ms", [0, 1, 1_700_000_000_123, 2**50 - 1])
def test_id_timestamp_round_trips(ms: int) -> None:
    """id_timestamp_ms returns the time the id was made for."""
    assert ids.id_timestamp_ms(ids.new_message_id(now_ms=ms)) == ms


def test_id_for_now_carries_the_current_time() -> None:
    """Without now_ms the id encodes the current time."""
    before = time.time_ns() // 1_000_000
    mid = ids.new_message_id()
    after = time.time_ns() // 1_000_000
    assert before <= ids.id_timestamp_ms(mid) <= after


def test_ids_are_unique() -> None:
    """Ids made in the same millisecond still differ (80 random bits)."""
    assert len({ids.new_message_id(now_ms=5) for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    "text",
    [
        "",
        "01ARZ3NDEKTSV4RRFFQ69G5FA",
        "01ARZ3NDEKTSV4RRFFQ69G5FAVV",
        "01arz3ndektsv4rrffq69g5fav",
        "01ARZ3NDEKTSV4RRFFQ69G5FAU",
        "01ARZ3NDEKTSV4RRFFQ69G5FA/",
        "../../etc/passwd..........",
    ],
)
def test_is_message_id_rejects_other_text(text: str) -> None:
    """Wrong length, lower case, U, and path characters are not message ids."""
    assert not ids.is_message_id(text)


# -- domains ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [
        ("*.example.com", "mail.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "badexample.com", False),
        ("*.example.com", "example.com.evil.org", False),
        ("example.com", "example.com", True),
        ("example.com", "mail.example.com", False),
        ("*", "example.com", True),
        ("*", "a.b.c.d", True),
        ("*.Example.COM", "MAIL.example.com", True),
        ("example.com.", "EXAMPLE.COM", True),
        ("example.com", "example.com.", True),
        ("mail?.example.com", "mail1.example.com", True),
        ("mail?.example.com", "mail12.example.com", False),
    ],
)
def test_domain_globs(pattern: str, domain: str, matches: bool) -> None:
    """'*.x' matches subdomains only, '*' matches all, case and a trailing dot are ignored."""
    assert domain_matches(pattern, domain) is matches


def test_any_matches() -> None:
    """any_matches is true when one of the globs matches."""
    assert any_matches(["a.com", "*.b.com"], "x.b.com")
    assert not any_matches(["a.com", "*.b.com"], "b.com")
    assert not any_matches([], "a.com")


@pytest.mark.parametrize(
    ("pattern", "normalised"),
    [
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*", "*"),
        (" mail-1.example.com ", "mail-1.example.com"),
        ("mail?.x.org", "mail?.x.org"),
    ],
)
def test_validate_glob_accepts_and_normalises(pattern: str, normalised: str) -> None:
    """Valid globs come back lower-cased and without a trailing dot or spaces."""
    assert validate_glob(pattern) == normalised


@pytest.mark.parametrize("pattern", ["a..b", "**", "*.**.com", "exa mple.com", "", ".", "[a].com"])
def test_validate_glob_rejects(pattern: str) -> None:
    """Empty labels, '**', spaces, empty patterns and fnmatch brackets are rejected."""
    with pytest.raises(GlobError, match="bad domain pattern"):
        validate_glob(pattern)


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("alice@Example.COM", "example.com"),
        ("alice@example.com.", "example.com"),
        ('"a@b"@example.org', "example.org"),
        ('"weird local"@x.net', "x.net"),
        ("<>", ""),
        ("", ""),
        ("postmaster", ""),
    ],
)
def test_domain_of(address: str, domain: str) -> None:
    """The domain after the last '@', normalised; '' for the null sender or no domain."""
    assert domain_of(address) == domain


# -- routing ---------------------------------------------------------------------------


def rule(rule_id: int, provider: str, priority: int = 10, **conditions: Any) -> Rule:
    """A tenant-1 rule; conditions are Rule's keyword fields (sender_domain, enabled, ...)."""
    return Rule(id=rule_id, tenant_id=1, priority=priority, provider=provider, **conditions)


def providers_of(
    rules: Sequence[Rule],
    recipients: Sequence[str],
    *,
    mail_from: str = "app@sender.example",
    account_id: int = 1,
    default_route: str = "",
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """route() reduced to {provider: recipients} and the unrouted recipients."""
    groups, unrouted = route(
        sort_rules(rules),
        account_id=account_id,
        mail_from=mail_from,
        recipients=recipients,
        default_route=default_route,
    )
    return {g.provider: g.recipients for g in groups}, unrouted


def test_rules_sort_by_priority_then_id() -> None:
    """sort_rules orders by ascending priority, ties broken by ascending id."""
    rules = [rule(2, "b", 5), rule(1, "a", 5), rule(3, "c", 1), rule(4, "d", 9)]
    assert [r.id for r in sort_rules(rules)] == [3, 1, 2, 4]


def test_lowest_priority_catch_all_wins() -> None:
    """Among catch-all rules, the one with the lowest priority value routes everything."""
    rules = [rule(1, "late", 50), rule(2, "early", 5)]
    assert providers_of(rules, ["a@x.org"]) == ({"early": ("a@x.org",)}, [])


def test_priority_tie_goes_to_lower_id() -> None:
    """With equal priority the rule with the lower id is tried first."""
    rules = [rule(9, "nine", 5), rule(3, "three", 5)]
    assert providers_of(rules, ["a@x.org"]) == ({"three": ("a@x.org",)}, [])


def test_first_match_wins_per_recipient() -> None:
    """Each recipient goes to the first rule that matches it, so one message can split."""
    rules = [rule(1, "gmail-route", 1, recipient_domain="gmail.com"), rule(2, "catch-all", 2)]
    groups, unrouted = route(
        sort_rules(rules), account_id=1, mail_from="a@s.com", recipients=["x@gmail.com", "y@o.org"]
    )
    assert groups == [
        RouteGroup("gmail-route", ("x@gmail.com",), rule_id=1),
        RouteGroup("catch-all", ("y@o.org",), rule_id=2),
    ]
    assert unrouted == []


def test_recipient_domain_condition_ignores_case() -> None:
    """Recipient domains are compared case-insensitively."""
    rules = [rule(1, "g", recipient_domain="*.gmail.com")]
    assert providers_of(rules, ["X@MAIL.GMAIL.COM", "y@gmail.com"]) == (
        {"g": ("X@MAIL.GMAIL.COM",)},
        ["y@gmail.com"],
    )


@pytest.mark.parametrize(
    ("mail_from", "provider"),
    [
        ("app@mail.example.com", "by-sender"),
        ("app@example.com", "other"),
        ("<>", "other"),
        ("", "other"),
    ],
)
def test_sender_domain_condition(mail_from: str, provider: str) -> None:
    """A sender glob applies only to matching sender domains; the null sender never matches."""
    rules = [rule(1, "by-sender", 1, sender_domain="*.example.com"), rule(2, "other", 2)]
    assert providers_of(rules, ["r@x.org"], mail_from=mail_from)[0] == {provider: ("r@x.org",)}


@pytest.mark.parametrize(("account_id", "provider"), [(7, "for-7"), (8, "other")])
def test_account_condition(account_id: int, provider: str) -> None:
    """A rule bound to an account applies only to mail submitted by that account."""
    rules = [rule(1, "for-7", 1, account_id=7), rule(2, "other", 2)]
    assert providers_of(rules, ["r@x.org"], account_id=account_id)[0] == {provider: ("r@x.org",)}


@pytest.mark.parametrize(
    ("account_id", "mail_from", "rcpt", "matches"),
    [
        (7, "a@s.com", "r@r.com", True),
        (8, "a@s.com", "r@r.com", False),
        (7, "a@t.com", "r@r.com", False),
        (7, "a@s.com", "r@q.com", False),
    ],
)
def test_all_conditions_must_hold(
    account_id: int, mail_from: str, rcpt: str, matches: bool
) -> None:
    """A rule with sender, recipient and account conditions needs all three to match."""
    strict = rule(1, "strict", 1, account_id=7, sender_domain="s.com", recipient_domain="r.com")
    got, _ = providers_of(
        [strict, rule(2, "other", 2)], [rcpt], account_id=account_id, mail_from=mail_from
    )
    assert got == {("strict" if matches else "other"): (rcpt,)}


def test_disabled_rules_are_skipped() -> None:
    """A disabled rule is passed over even when it would match first."""
    rules = [rule(1, "off", 1, enabled=False), rule(2, "on", 2)]
    assert providers_of(rules, ["r@x.org"]) == ({"on": ("r@x.org",)}, [])


def test_default_route_when_no_rule_matches() -> None:
    """Recipients no rule takes go to the default route, in a group without a rule id."""
    rules = [rule(1, "g", recipient_domain="gmail.com")]
    groups, unrouted = route(
        rules,
        account_id=1,
        mail_from="a@s.com",
        recipients=["a@o.org", "b@gmail.com"],
        default_route="outbox",
    )
    assert groups == [
        RouteGroup("outbox", ("a@o.org",), rule_id=None),
        RouteGroup("g", ("b@gmail.com",), rule_id=1),
    ]
    assert unrouted == []


def test_unrouted_recipients_are_returned() -> None:
    """Without a default route, recipients no rule takes are returned as unrouted."""
    rules = [rule(1, "g", recipient_domain="gmail.com")]
    assert providers_of(rules, ["a@o.org", "b@gmail.com", "c@p.org"]) == (
        {"g": ("b@gmail.com",)},
        ["a@o.org", "c@p.org"],
    )


def test_no_rules_and_no_default_route_routes_nothing() -> None:
    """With no rules and no default route every recipient is unrouted."""
    assert providers_of([], ["a@o.org", "b@p.org"]) == ({}, ["a@o.org", "b@p.org"])


def test_same_provider_via_two_rules_forms_one_group() -> None:
    """Recipients sent to one provider by different rules are delivered together."""
    rules = [rule(1, "sg", 1, recipient_domain="a.com"), rule(2, "sg", 2, recipient_domain="b.com")]
    groups, unrouted = route(
        sort_rules(rules),
        account_id=1,
        mail_from="x@s.com",
        recipients=["x@b.com", "y@a.com", "z@b.com"],
    )
    assert [(g.provider, g.recipients) for g in groups] == [
        ("sg", ("x@b.com", "y@a.com", "z@b.com"))
    ]
    assert unrouted == []


def test_different_providers_form_separate_groups() -> None:
    """Each provider gets its own group holding its recipients in their original order."""
    rules = [rule(1, "p1", 1, recipient_domain="a.com"), rule(2, "p2", 2, recipient_domain="b.com")]
    assert providers_of(rules, ["1@a.com", "2@b.com", "3@a.com"]) == (
        {"p1": ("1@a.com", "3@a.com"), "p2": ("2@b.com",)},
        [],
    )


def test_group_carries_the_rule_fallbacks() -> None:
    """A group keeps the fallback providers of the rule that chose it."""
    groups, _ = route(
        [rule(1, "sg", fallbacks=("ses", "mg"))], account_id=1, mail_from="", recipients=["r@x.org"]
    )
    assert groups == [RouteGroup("sg", ("r@x.org",), ("ses", "mg"), 1)]


# -- retry -----------------------------------------------------------------------------

SCHEDULE = (30, 60, 120, 300, 900, 1800)


def policy(factor: str = "mid", **kwargs: Any) -> RetryPolicy:
    """A policy whose jitter always lands on the low end, the middle or the high end."""
    pick = {"low": lambda a, b: a, "mid": lambda a, b: (a + b) / 2, "high": lambda a, b: b}[factor]
    return RetryPolicy(uniform=pick, **kwargs)


RETRY = Outcome.retry("503 from provider")


def test_delivered() -> None:
    """A delivered outcome makes the message DELIVERED."""
    assert decide(Outcome.delivered("p-1"), 1, 0, policy()) == Decision(Status.DELIVERED)


@pytest.mark.parametrize(("attempts", "age"), [(1, 0), (10, 0), (50, 10 * 86400)])
def test_permanent_failure_is_never_retried(attempts: int, age: float) -> None:
    """A permanent failure is FAILED with its reason, never RETRYING and never DLQ."""
    got = decide(Outcome.permanent("550 no such user"), attempts, age, policy())
    assert got == Decision(Status.FAILED, reason="550 no such user")


@pytest.mark.parametrize("attempts", range(1, 10))
@pytest.mark.parametrize(("factor", "scale"), [("low", 0.8), ("mid", 1.0), ("high", 1.2)])
def test_retry_delays_follow_the_schedule(attempts: int, factor: str, scale: float) -> None:
    """Attempt n waits schedule[n-1] (then the last entry) within +/-20 % jitter."""
    got = decide(RETRY, attempts, 0, policy(factor))
    expected = SCHEDULE[min(attempts, len(SCHEDULE)) - 1] * scale
    assert got.status is Status.RETRYING
    assert got.delay == pytest.approx(expected)
    assert got.reason == "503 from provider"


def test_retry_after_is_honoured_when_longer() -> None:
    """A provider's Retry-After longer than the schedule's delay is used instead."""
    got = decide(Outcome.retry("429", retry_after=500), 1, 0, policy("high"))
    assert got == Decision(Status.RETRYING, delay=500, reason="429")


def test_retry_after_shorter_than_schedule_is_ignored() -> None:
    """A Retry-After shorter than the scheduled delay does not shorten it."""
    got = decide(Outcome.retry("429", retry_after=5), 2, 0, policy("mid"))
    assert got.delay == pytest.approx(60)


def test_max_attempts_dead_letters() -> None:
    """The attempt numbered max_attempts that fails sends the message to the DLQ."""
    assert decide(RETRY, 9, 0, policy()).status is Status.RETRYING
    last = decide(RETRY, 10, 0, policy())
    assert last.status is Status.DLQ
    assert last.delay is None
    assert "10 attempts" in last.reason
    assert decide(RETRY, 3, 0, policy(max_attempts=3)).status is Status.DLQ


def test_max_age_dead_letters() -> None:
    """A retry that would fall after max_age dead-letters the message instead."""
    p = policy("mid", max_age=1000)
    assert decide(RETRY, 1, 970, p) == Decision(Status.RETRYING, delay=30, reason=RETRY.detail)
    too_old = decide(RETRY, 1, 971, p)
    assert too_old.status is Status.DLQ
    assert "too old" in too_old.reason


def test_retry_after_past_max_age_dead_letters() -> None:
    """A Retry-After that reaches past max_age dead-letters the message."""
    got = decide(Outcome.retry("429", retry_after=3600), 1, 0, policy(max_age=600))
    assert got.status is Status.DLQ


# -- headers ---------------------------------------------------------------------------


def test_summary_of_a_plain_message() -> None:
    """Subject, Message-ID (without brackets), From, To and Cc are picked from the header."""
    raw = (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nCc: carol@example.net\r\n"
        b"Subject: hello\r\nMessage-ID: <abc.123@example.com>\r\nX-Other: y\r\n\r\nbody\r\n"
    )
    assert summarize(raw) == HeaderSummary(
        subject="hello",
        message_id="abc.123@example.com",
        from_="Alice <alice@example.com>",
        to="bob@example.org",
        cc="carol@example.net",
    )


def test_folded_headers_are_unfolded() -> None:
    """Continuation lines (space or tab) are joined with single spaces."""
    raw = b"To: a@x.org,\r\n\tb@x.org,\r\n   c@x.org\r\nSubject: one\r\n two\r\n\r\n"
    got = summarize(raw)
    assert got.to == "a@x.org, b@x.org, c@x.org"
    assert got.subject == "one two"


def test_rfc2047_subject_is_decoded() -> None:
    """Encoded words in the subject are decoded, adjacent ones joined across a fold."""
    raw = b"Subject: =?utf-8?q?Caf=C3=A9?=\r\n =?utf-8?b?IGF1IGxhaXQ=?=\r\n\r\n"
    assert summarize(raw).subject == "Café au lait"


def test_bad_rfc2047_subject_is_kept_as_text() -> None:
    """An undecodable encoded word does not raise; some text is kept."""
    got = summarize(b"Subject: =?nonexistent-charset?q?abc?=\r\n\r\n")
    assert "abc" in got.subject


def test_first_occurrence_wins() -> None:
    """A repeated header (and its folded continuation) does not replace the first one."""
    raw = b"Subject: first\r\nSubject: second\r\n more\r\nTo: a@x\r\nto: b@x\r\n\r\n"
    got = summarize(raw)
    assert (got.subject, got.to) == ("first", "a@x")


def test_headers_after_the_blank_line_are_ignored() -> None:
    """Header-like lines in the body are not part of the summary."""
    raw = b"Subject: s\r\n\r\nTo: body@x.org\r\nCc: body@x.org\r\n"
    assert summarize(raw) == HeaderSummary(subject="s")


def test_nul_bytes_are_removed() -> None:
    """NUL characters never reach the summary."""
    got = summarize(b"Subject: a\x00b\r\nTo: c\x00@x\r\n\r\n")
    assert (got.subject, got.to) == ("ab", "c@x")


def test_long_values_are_capped() -> None:
    """Values are cut to 998 characters."""
    assert len(summarize(b"Subject: " + b"x" * 5000 + b"\r\n\r\n").subject) == 998


def test_bare_lf_message() -> None:
    """A message with bare LF line ends is summarised the same way."""
    raw = b"Subject: hi\nTo: a@x.org,\n b@x.org\n\nCc: body@x.org\n"
    assert summarize(raw) == HeaderSummary(subject="hi", to="a@x.org, b@x.org")


def test_mixed_line_ends_body_is_not_header() -> None:
    """The header block ends at the first blank line, whichever line end it uses."""
    raw = b"Subject: hi\n\nCc: body@x.org\r\n\r\nmore\r\n"
    assert summarize(raw) == HeaderSummary(subject="hi")


def test_empty_and_headerless_input() -> None:
    """Empty input and text without header fields give an empty summary."""
    assert summarize(b"") == HeaderSummary()
    assert summarize(b"\r\n\r\nTo: x@y\r\n") == HeaderSummary()
    assert summarize(b"just text\r\nmore text\r\n") == HeaderSummary()


@pytest.mark.parametrize("raw", [b"\r\nTo: x@y\r\n", b"\r\nTo: x@y\r\n\r\nbody\r\n"])
def test_message_starting_with_blank_line_has_no_headers(raw: bytes) -> None:
    """An empty first line means an empty header block: body lines are not headers."""
    assert summarize(raw) == HeaderSummary()


# -- SMTP replies ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("221 Bye", "221 2.0.0 Bye"),
        ("451 try later", "451 4.3.0 try later"),
        ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
        ("501 Syntax: HELO hostname", "501 5.5.4 Syntax: HELO hostname"),
        ("503 Error: need MAIL", "503 5.5.1 Error: need MAIL"),
        ("535 no", "535 5.7.8 no"),
        ("554 no", "554 5.0.0 no"),
        ("299 odd", "299 2.0.0 odd"),
        ("599 odd", "599 5.0.0 odd"),
        ("250-mail.example.com", "250-2.0.0 mail.example.com"),
        ("250 ", "250 2.0.0"),
    ],
)
def test_enhanced_code_is_added(reply: str, expected: str) -> None:
    """2xx/4xx/5xx replies without an enhanced code get the class default, separator kept."""
    assert with_enhanced_code(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        "334 VXNlcm5hbWU6",
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.1.0 Sender ok",
        "250-2.0.0 first line",
        "550 5.7.1 denied",
        "452 4.5.3 Too many recipients",
        "250",
        "",
        "hello",
        "250_odd separator",
    ],
)
def test_enhanced_code_is_left_alone(reply: str) -> None:
    """3xx replies, replies that already carry a code, and non-replies pass unchanged."""
    assert with_enhanced_code(reply) == reply


def test_greeting_is_left_alone() -> None:
    """The 220 greeting keeps the server's domain as its first word."""
    assert (
        with_enhanced_code("220 mx.example.com ESMTP smtpproxy")
        == "220 mx.example.com ESMTP smtpproxy"
    )


def test_multi_line_reply_keeps_its_separators() -> None:
    """Each line of a multi-line reply gets a code and keeps '-' or ' ' after the number."""
    lines = ["250-first", "250-second", "250 last"]
    assert [with_enhanced_code(x) for x in lines] == [
        "250-2.0.0 first",
        "250-2.0.0 second",
        "250 2.0.0 last",
    ]


def test_module_replies_already_carry_codes() -> None:
    """Every reply constant in replies.py passes through with_enhanced_code unchanged."""
    constants = [v for k, v in vars(replies).items() if k.isupper() and isinstance(v, str)]
    assert len(constants) > 10
    for text in constants:
        assert re.match(r"^[245]\d\d [245]\.\d{1,3}\.\d{1,3} ", text), text
        assert with_enhanced_code(text) == text


# -- status transitions ----------------------------------------------------------------


def test_every_status_has_a_transition_entry() -> None:
    """TRANSITIONS names every Status, and only statuses, as keys and targets."""
    assert set(TRANSITIONS) == set(Status)
    for targets in TRANSITIONS.values():
        assert targets <= set(Status)


def test_final_states_have_no_exit_except_replay() -> None:
    """Final statuses are dead ends, except an operator's DLQ/FAILED -> QUEUED replay."""
    exits = {s: TRANSITIONS[s] for s in FINAL if TRANSITIONS[s]}
    assert exits == {Status.DLQ: {Status.QUEUED}, Status.FAILED: {Status.QUEUED}}


def test_no_status_moves_to_itself() -> None:
    """No status lists itself as a successor."""
    assert all(s not in TRANSITIONS[s] for s in Status)


def test_may_transition() -> None:
    """may_transition follows the table."""
    assert may_transition(Status.QUEUED, Status.SENDING)
    assert may_transition(Status.SENDING, Status.DELIVERED)
    assert may_transition(Status.DLQ, Status.QUEUED)
    assert not may_transition(Status.DELIVERED, Status.QUEUED)
    assert not may_transition(Status.QUEUED, Status.DELIVERED)
    assert not may_transition(Status.ENQUEUE_FAILED, Status.SENDING)


def test_enqueue_failed_is_never_delivered() -> None:
    """No path leads from ENQUEUE_FAILED (the client saw 451) to DELIVERED."""
    reachable, todo = set(), [Status.ENQUEUE_FAILED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert Status.DELIVERED not in reachable


# -- passwords -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stored() -> str:
    return passwords.hash_password("correct horse ✓")


def test_password_round_trip(stored: str) -> None:
    """A password verifies against its own hash, as str or as UTF-8 bytes."""
    assert passwords.verify_password("correct horse ✓", stored)
    assert passwords.verify_password("correct horse ✓".encode(), stored)


def test_stored_form(stored: str) -> None:
    """The stored hash records scheme and parameters and not the password."""
    assert stored.startswith("scrypt$14$8$1$")
    assert len(stored.split("$")) == 6
    assert "correct" not in stored


@pytest.mark.parametrize("wrong", ["correct horse", "Correct horse ✓", "", "correct horse ✓ "])
def test_wrong_password_is_false(stored: str, wrong: str) -> None:
    """Any other password does not verify."""
    assert not passwords.verify_password(wrong, stored)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plaintext",
        "bcrypt$14$8$1$c2FsdA$aGFzaA",
        "scrypt$14$8$1$c2FsdA",
        "scrypt$x$8$1$c2FsdA$aGFzaA",
        "scrypt$14$8$1$!!!$aGFzaA",
        "scrypt$14$8$1$c2FsdA$a",
        "scrypt$3$0$1$c2FsdA$aGFzaA",
        "scrypt$14$8$1$c2FsdA$aGFzaA$extra",
        "scrypt$-1$8$1$c2FsdA$aGFzaA",
        "scrypt$40$8$1$c2FsdA$aGFzaA",
        "scrypt$14$8$1$c2FsdA$\u00e9",
    ],
)
def test_malformed_hash_is_false(bad: str) -> None:
    """A malformed stored hash makes verification false, never an exception."""
    assert passwords.verify_password("anything", bad) is False


def test_two_hashes_of_one_password_differ(stored: str) -> None:
    """Each hash has its own salt, and both verify."""
    again = passwords.hash_password("correct horse ✓")
    assert again != stored
    assert passwords.verify_password("correct horse ✓", again)


SIMPLE_ADDRESS_LISTS = [
    "alice@example.com",
    "Alice <alice@example.com>",
    "Alice Ex <alice@example.com>, bob@example.org",
    "  Bob   Smith   <bob.smith+tag@mail.example.org>  ,carol@example.org",
    "<x@y.z>",
    "a@b, , c@d",
    "A\t B <a@b.c>",
    "o'neil@example.ie",
]
NOT_SIMPLE = [
    "Al.ice <a@b.c>",
    '"Quoted, Name" <a@b.c>',
    "x (comment) <a@b.c>",
    "=?utf-8?q?J=C3=B6rg?= <a@b.c>",
    "group: a@b.c;",
    "a@b.c>",
    "<a@b.c",
    "a b@c.d",
    "jörg@x.de",
    "a@[1.2.3.4]",
    "a..b@c.d",
    ".a@c.d",
    "a@c.d.",
    "Name <a@b.c> extra",
]


@pytest.mark.parametrize("value", SIMPLE_ADDRESS_LISTS + NOT_SIMPLE)
def test_simple_address_lists_read_as_the_full_parser_reads_them(value: str) -> None:
    """The fast reading of plain address lists agrees with the RFC 5322 parser of the
    email package wherever it answers, and leaves everything else to it."""
    fast = mime.simple_addresses(value)
    assert (fast is not None) == (value in SIMPLE_ADDRESS_LISTS)
    if fast is not None:
        full = email.policy.default.header_factory("To", value)
        assert fast == [
            mime.Address(a.addr_spec, a.display_name or "") for a in full.addresses if a.addr_spec
        ]


def test_backoff_doubles_to_its_ceiling_and_starts_again_after_a_healthy_run() -> None:
    from smtpproxy.runtime.supervise import HEALTHY_AFTER, Backoff

    backoff = Backoff(0.5, 3.0)
    assert [backoff.next() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff.after_run(1.0) == 3.0  # a crash right after start: keep waiting long
    assert backoff.after_run(HEALTHY_AFTER + 1) == 0.5
    assert backoff.next() == 1.0
