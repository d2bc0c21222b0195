"""`run.processes` and `run.delivery_processes`: one `smtpproxy run` command serving
with several processes.

One Python process uses one core (the interpreter lock), so on a machine with cores to
spare `smtpproxy run` can start more processes itself. The first (the primary) starts
the others (workers) as `smtpproxy run` with the same configuration and
SMTPPROXY_WORKER in their environment, and keeps them running:

* SMTP processes (the primary and run.processes - 1 workers) bind the SMTP listeners,
  with SO_REUSEPORT when there are several (the kernel spreads new connections between
  them); delivery processes (run.delivery_processes workers) bind none and only run
  delivery consumers. With no delivery process every SMTP process delivers too. Split
  this way, accepting mail and delivering it do not share an interpreter: on two cores
  the relay delivered about 1.5 times as fast (docs/performance.md). The retry
  scheduler, the reconciler and the storage checker run in the primary only;
* a worker tells the primary the port of its private health endpoint (127.0.0.1, an
  ephemeral port) through a pipe once it is ready; the primary's /readyz includes every
  worker, and its /metrics adds up the workers' own counters (metrics.merge);
* SIGTERM, SIGINT and SIGHUP to the primary go to every worker; a worker that exits
  unexpectedly is started again with backoff; a worker whose primary dies notices at
  once (a pidfd) and drains;
* a worker logs where the primary does, except that its log file (log.output "file")
  is its own: smtpproxy.worker1.log next to smtpproxy.log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import attrs
import h11
import trio
from loguru import logger

from smtpproxy.config import Config
from smtpproxy.runtime import embedded
from smtpproxy.runtime.supervise import Backoff

WORKER_ENV = "SMTPPROXY_WORKER"  # "<index>:<fd>:<primary pid>[:d]", for a worker only
READY_TIMEOUT = 120.0  # a worker that does not report ready by then is started again
STOP_MARGIN = 10.0  # beyond delivery.shutdown_grace, then a worker is killed


@attrs.frozen
class Role:
    """Which process of `smtpproxy run` this is: index 0 is the primary."""

    index: int = 0
    report_fd: int | None = None  # a worker reports its health port here
    primary_pid: int | None = None
    delivery_only: bool = False  # a delivery process: no SMTP listener

    @property
    def primary(self) -> bool:
        return self.index == 0

    @property
    def env_value(self) -> str:
        kind = ":d" if self.delivery_only else ""
        return f"{self.index}:{self.report_fd}:{self.primary_pid}{kind}"

    @classmethod
    def of(cls, environ: Mapping[str, str]) -> Role:
        value = environ.get(WORKER_ENV)
        if not value:
            return cls()
        index, fd, pid, *kind = value.split(":")
        return cls(int(index), int(fd), int(pid), delivery_only=kind == ["d"])


def process_config(cfg: Config, role: Role) -> Config:
    """The configuration one process serves with: with several SMTP processes the
    listeners are shared (SO_REUSEPORT), and a worker's health endpoint is private."""
    if role.primary and cfg.run.processes == 1:
        return cfg
    if cfg.run.processes > 1:
        cfg = attrs.evolve(cfg, smtp=attrs.evolve(cfg.smtp, reuse_port=True))
    if role.primary:
        return cfg
    log_file = cfg.log_file_path.with_suffix(f".worker{role.index}{cfg.log_file_path.suffix}")
    return attrs.evolve(
        cfg,
        health=attrs.evolve(cfg.health, listen="127.0.0.1:0"),
        log=attrs.evolve(cfg.log, file_path=str(log_file)),
    )


async def primary_exited(role: Role) -> None:
    """In a worker: return once the primary process has exited (its pidfd becomes
    readable; without pidfds, the parent pid is checked every second).

    Not PR_SET_PDEATHSIG: that signal follows the thread that started the worker, and
    trio starts processes from a worker thread, which exits after 10 s idle: every
    worker was told to stop 10 s after it started whenever the thread went idle."""
    pid = role.primary_pid
    if pid is None:
        await trio.sleep_forever()
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here, or the primary is already gone
        while os.getppid() == pid:  # noqa: ASYNC110 - nothing to wait on but time
            await trio.sleep(1.0)
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def report_ready(role: Role, health_port: int) -> None:
    """In a worker: tell the primary where its health endpoint is; that means ready."""
    if role.report_fd is None:
        return
    os.write(role.report_fd, f"{health_port}\n".encode())
    os.close(role.report_fd)


def worker_roles(cfg: Config) -> list[Role]:
    """The processes the primary starts: run.processes - 1 SMTP processes, then
    run.delivery_processes delivery processes (none while delivery is off)."""
    smtp = [Role(i) for i in range(1, cfg.run.processes)]
    count = cfg.run.delivery_processes if cfg.delivery.enabled else 0
    first = cfg.run.processes
    return smtp + [Role(first + i, delivery_only=True) for i in range(count)]


def delivers_here(role: Role, cfg: Config, workers: Workers | None) -> bool:
    """Whether this process runs delivery consumers: a delivery process does; an SMTP
    process does unless delivery processes run beside it (the primary knows whether it
    starts any; an SMTP worker reads it from the configuration)."""
    if role.delivery_only:
        return True
    if role.primary:
        return workers is None or not any(w.role.delivery_only for w in workers.workers)
    return cfg.run.delivery_processes == 0


@attrs.define
class Worker:
    role: Role  # which process; its pipe and the primary's pid are added at each start
    process: trio.Process | None = None
    health_port: int | None = None  # set when it reported ready


class Workers:
    """The primary's view of the other processes: start, watch, signal, stop."""

    def __init__(self, cfg: Config, environ: Mapping[str, str] | None = None) -> None:
        self._cfg = cfg
        self._environ = dict(os.environ if environ is None else environ)
        if cfg.source:  # a worker reads the same file, wherever it was found
            self._environ["SMTPPROXY_CONFIG"] = str(Path(cfg.source).resolve())
        self.workers = [Worker(role) for role in worker_roles(cfg)]
        self.stopping = False
        self._reported = trio.Event()  # set when a worker reports ready

    # -- what the primary's health endpoint asks

    def ports(self) -> list[int]:
        return [w.health_port for w in self.workers if w.health_port is not None]

    async def check(self) -> None:
        """For /readyz: every worker is running and ready."""
        down = [str(w.role.index) for w in self.workers if w.health_port is None]
        if down:
            raise RuntimeError(f"worker {', '.join(down)} not ready (starting or restarting)")

    async def metrics(self) -> list[str]:
        """The process-local metrics of every ready worker (one that does not answer
        within a second is left out of this scrape)."""
        texts: list[str] = []

        async def one(port: int) -> None:
            with trio.move_on_after(1.0):
                with contextlib.suppress(OSError, h11.ProtocolError, ValueError):
                    texts.append(await fetch_local(port, "/metrics/process"))

        async with trio.open_nursery() as nursery:
            for port in self.ports():
                nursery.start_soon(one, port)
        return texts

    # -- lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every worker and keep it running until stop(); started once every
        worker reported ready (or READY_TIMEOUT passed: /readyz then says which is not)."""
        async with trio.open_nursery() as nursery:
            for worker in self.workers:
                nursery.start_soon(self._keep, worker)
            with trio.move_on_after(READY_TIMEOUT):
                while not all(w.health_port is not None for w in self.workers):
                    self._reported = trio.Event()
                    await self._reported.wait()
            task_status.started()

    async def _keep(self, worker: Worker) -> None:
        backoff = Backoff(1.0, 60.0)
        while not self.stopping:
            started = trio.current_time()
            code = await self._run_once(worker)
            if self.stopping:
                return
            wait = backoff.after_run(trio.current_time() - started)
            logger.error(
                "worker {} exited unexpectedly ({}); starting it again in {:.0f} s",
                worker.role.index,
                f"code {code}" if code is not None else "not ready in time",
                wait,
            )
            await trio.sleep(wait)

    async def _run_once(self, worker: Worker) -> int | None:
        read_fd, write_fd = os.pipe()
        role = attrs.evolve(worker.role, report_fd=write_fd, primary_pid=os.getpid())
        env = {
            **self._environ,
            **embedded.worker_environment(self._cfg),
            WORKER_ENV: role.env_value,
        }
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "smtpproxy", "run"],
                env=env,
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(write_fd)
        worker.process = process
        kind = "delivery worker" if role.delivery_only else "worker"
        logger.info("started {} {} (pid {})", kind, role.index, process.pid)
        try:
            port = await self._ready_port(read_fd)
            if port is None:
                process.kill()
                await process.wait()
                return None
            worker.health_port = port
            self._reported.set()
            return await process.wait()
        finally:
            worker.health_port = None
            worker.process = None

    @staticmethod
    async def _ready_port(read_fd: int) -> int | None:
        """The port the worker reports when ready; None if it exits or takes too long."""
        pipe = trio.lowlevel.FdStream(read_fd)
        data = b""
        with trio.move_on_after(READY_TIMEOUT):
            async with pipe:
                while not data.endswith(b"\n"):
                    chunk = await pipe.receive_some(64)
                    if not chunk:
                        return None
                    data += chunk
                return int(data)
        return None

    def signal(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def stop(self) -> None:
        """SIGTERM every worker (they drain like the primary), wait for them, kill any
        still running after delivery.shutdown_grace and a margin."""
        self.stopping = True
        self.signal(signal.SIGTERM)
        with trio.move_on_after(self._cfg.delivery.shutdown_grace + STOP_MARGIN):
            for worker in self.workers:
                if worker.process is not None:
                    await worker.process.wait()
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                logger.warning("worker {} did not stop in time: killed", worker.role.index)
                worker.process.kill()


async def fetch_local(port: int, path: str) -> str:
    """GET a path of a worker's health endpoint on 127.0.0.1 (the body as text)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    async with stream:
        request = h11.Request(
            method="GET", target=path, headers=[("Host", "127.0.0.1"), ("Connection", "close")]
        )
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        body = b""
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise ValueError(f"{path}: HTTP {status}")
        return body.decode()
