"""Offload.until: a blocking call with a deadline, whose late completion is undone."""

from __future__ import annotations

import threading

import pytest
import trio

from smtpproxy.runtime.threads import DeadlinePassed, Offload


async def test_a_call_in_time_returns_its_value_and_undoes_nothing() -> None:
    late: list[str] = []
    value = await Offload("t", 1).until(
        trio.current_time() + 5, lambda: late.append("x"), lambda: 42
    )
    assert value == 42 and late == []


async def test_a_call_past_its_deadline_is_undone_when_it_ends() -> None:
    """The caller is answered at the deadline; the call runs on and, when it ends, its
    undo runs on the trio thread."""
    release = threading.Event()
    ran: list[str] = []
    undone = trio.Event()
    with trio.fail_after(10):
        with pytest.raises(DeadlinePassed):
            await Offload("t", 1).until(
                trio.current_time() + 0.2,
                undone.set,
                lambda: (release.wait(5), ran.append("done")),
            )
        assert not undone.is_set()
        release.set()
        await undone.wait()
    assert ran == ["done"]


async def test_a_call_that_never_got_a_thread_never_runs() -> None:
    """Waiting for a free thread past the deadline: the call is dropped unrun."""
    offload = Offload("t", 1)
    release = threading.Event()
    ran: list[str] = []
    late: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(offload, release.wait, 5)  # holds the only thread
            await trio.sleep(0.05)
            with pytest.raises(DeadlinePassed):
                await offload.until(
                    trio.current_time() + 0.2, lambda: late.append("x"), lambda: ran.append("x")
                )
            release.set()
        await trio.sleep(0.1)
    assert ran == [] and late == []
