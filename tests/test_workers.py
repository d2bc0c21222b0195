"""Which processes `smtpproxy run` starts and which of them deliver (runtime/workers.py),
as pure decisions on the configuration; the processes themselves are tested in
tests/test_faults.py."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import pytest

from smtpproxy.config import Config, default_delivery_processes, structure
from smtpproxy.runtime.workers import WORKER_ENV, Role, Workers, delivers_here, worker_roles
from tests.support.process import running


def config(**run: Any) -> Config:
    raw: dict[str, Any] = {"run": run, "smtp": {"listen": ["127.0.0.1:2525"]}}
    return structure(raw, "tests")


def test_one_delivery_process_by_default_where_there_is_a_second_core() -> None:
    """A single core keeps delivery in the SMTP process; two or more get a delivery process."""
    assert [default_delivery_processes(n) for n in (1, 2, 4, 64)] == [0, 1, 1, 1]


def test_worker_roles_are_smtp_processes_then_delivery_processes() -> None:
    """Indices 1.. are the other SMTP processes, then the delivery processes."""
    roles = worker_roles(config(processes=3, delivery_processes=2))
    assert [(r.index, r.delivery_only) for r in roles] == [
        (1, False),
        (2, False),
        (3, True),
        (4, True),
    ]
    assert worker_roles(config(processes=1, delivery_processes=0)) == []


def test_no_delivery_process_while_delivery_is_off() -> None:
    """delivery.enabled = false: only the SMTP processes start."""
    cfg = structure(
        {
            "run": {"processes": 2, "delivery_processes": 1},
            "delivery": {"enabled": False},
            "smtp": {"listen": ["127.0.0.1:2525"]},
        },
        "tests",
    )
    assert [r.delivery_only for r in worker_roles(cfg)] == [False]


@pytest.mark.parametrize("delivery_only", [False, True])
def test_role_travels_through_the_environment(delivery_only: bool) -> None:
    """A worker reads back the role the primary gave it."""
    role = Role(3, 7, 1234, delivery_only=delivery_only)
    assert Role.of({WORKER_ENV: role.env_value}) == role
    assert Role.of({}) == Role()


def test_who_delivers() -> None:
    """With delivery processes only they deliver; without, every SMTP process does; a
    primary started without workers (in-process) delivers itself."""
    split = config(processes=2, delivery_processes=1)
    together = config(processes=2, delivery_processes=0)
    primary, smtp_worker, delivery_worker = Role(), Role(1), Role(2, delivery_only=True)
    assert not delivers_here(primary, split, Workers(split, environ={}))
    assert not delivers_here(smtp_worker, split, None)
    assert delivers_here(delivery_worker, split, None)
    assert delivers_here(primary, together, Workers(together, environ={}))
    assert delivers_here(smtp_worker, together, None)
    assert delivers_here(primary, split, None)


# a parent process that starts a child from a thread that then exits, as trio starts
# workers (Popen in a worker thread); the child waits for its parent with
# primary_exited() and says when it returned
PARENT = """
import subprocess, sys, threading, time
child = []
def start():
    child.append(subprocess.Popen([sys.executable, "-c", sys.argv[1]]))
    time.sleep(2)  # the child is up; then this thread exits, as trio's idle ones do
t = threading.Thread(target=start)
t.start()
t.join()
print(child[0].pid, flush=True)
time.sleep(600)
"""
CHILD = """
import os, sys, trio
from smtpproxy.runtime.workers import Role, primary_exited
trio.run(primary_exited, Role(1, None, os.getppid()))
print("primary exited", flush=True)
"""


def test_a_worker_outlives_the_thread_that_started_it_and_not_its_primary() -> None:
    """The thread that started the worker exits at once: the worker keeps running (with
    PR_SET_PDEATHSIG it was stopped then); its parent killed, it notices within seconds."""
    with subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            time.sleep(0.5)
            assert running(child)  # the starting thread is gone
            parent.kill()
            parent.wait(timeout=10)
            deadline = time.monotonic() + 10
            while running(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not running(child)
        finally:
            parent.kill()
