"""The SMTP ingress service: aiosmtpd on its own uvloop thread, group commit on trio.

run_ingress() is a trio service (started with nursery.start): it starts the committers
and the call dispatcher, binds every listener on the ingress thread, reports the bound
addresses, and on cancellation closes the listeners and every session and stops the
thread. Draining (stop taking new sessions, let DATA in progress finish) is driven by
the service through the IngressHandle.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import ssl
import threading
from collections.abc import Callable
from typing import Any

import attrs
import trio
import uvloop
from loguru import logger

from smtpproxy.config import HostPort
from smtpproxy.errors import ConfigError, ListenError
from smtpproxy.ingress import bridge, tls
from smtpproxy.ingress.auth import Authenticator
from smtpproxy.ingress.commit import Committer
from smtpproxy.ingress.devices import Device
from smtpproxy.ingress.gate import Gate
from smtpproxy.ingress.guard import Guard
from smtpproxy.ingress.handler import IngressHandler
from smtpproxy.ingress.protocol import RelaySMTP
from smtpproxy.runtime import heap
from smtpproxy.runtime.resources import Resources

# aiosmtpd logs every command at INFO on "mail.log": far too costly and too chatty
logging.getLogger("mail.log").setLevel(logging.WARNING)


@attrs.define
class Listener:
    address: HostPort
    implicit_tls: bool = False
    # smtp.device_listen: registered device networks send without AUTH, older TLS is let in
    device: bool = False

    def describe(self) -> str:
        if self.device:
            return "SMTP for devices"
        return "SMTPS" if self.implicit_tls else "SMTP"


@attrs.define
class IngressHandle:
    gate: Gate
    bound: list[tuple[str, int]]
    committer: Committer
    authenticator: Authenticator
    tls: tls.ServerTls

    async def reload_tls(self) -> None:
        """Read the certificate files again (SIGHUP); sessions in progress keep theirs."""
        try:
            await trio.to_thread.run_sync(self.tls.reload)
        except ConfigError as exc:
            logger.error("TLS certificate not reloaded, keeping the current one: {}", exc)

    def begin_drain(self) -> None:
        self.gate.draining = True  # read by the ingress thread; a bool store is atomic

    async def wait_data_done(self) -> None:
        # the counter lives on the ingress thread; polling is simpler than a cross-thread event
        while self.gate.in_data:  # noqa: ASYNC110
            await trio.sleep(0.05)


class IngressThread:
    """The asyncio loop thread and its listening servers."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[tuple[Listener, Callable[[], RelaySMTP], ssl.SSLContext | None]],
        gate: Gate,
        *,
        reuse_port: bool = False,
    ) -> None:
        self._loop = loop
        self._listeners = listeners
        self._gate = gate
        self._reuse_port = reuse_port
        self._ready = threading.Event()
        self._error: ListenError | None = None
        self._servers: list[asyncio.Server] = []
        self._thread = threading.Thread(target=self._main, name="smtp-ingress", daemon=True)
        self.bound: list[tuple[str, int]] = []

    def start(self) -> list[tuple[str, int]]:
        """Start the thread and wait until every listener is bound (blocking)."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self.bound

    async def _bind(self) -> None:
        for listener, factory, ctx in self._listeners:
            addr = listener.address
            try:
                server = await self._loop.create_server(
                    factory,
                    addr.host,
                    addr.port,
                    ssl=ctx,
                    backlog=1024,
                    reuse_address=True,
                    reuse_port=self._reuse_port or None,
                )
            except OSError as exc:
                raise ListenError(f"smtp listener {addr}: {exc.strerror or exc}") from None
            self._servers.append(server)
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                self.bound.append((host, port))

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._bind())
        except ListenError as exc:
            self._error = exc
            self._close_servers()
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._close_servers()
            for proto in list(self._gate.protocols):
                if proto.transport is not None:
                    proto.transport.close()
            tasks = asyncio.all_tasks(self._loop)
            for task in tasks:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def _close_servers(self) -> None:
        for server in self._servers:
            server.close()

    def stop(self) -> None:
        """Stop the loop and wait for the thread (blocking)."""
        if self._loop.is_closed():
            return
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            return  # closed meanwhile
        self._thread.join(timeout=10)


async def _give_back_memory(gate: Gate) -> None:
    """After a burst of sessions, return the memory they freed (heap.AfterBursts)."""
    policy = heap.AfterBursts()
    while True:
        await trio.sleep(1)
        if policy.due(gate.ended, gate.sessions):
            await trio.to_thread.run_sync(heap.trim)


async def run_ingress(
    res: Resources,
    listeners: list[Listener] | None = None,
    *,
    directory: Any = None,  # DirectoryHolder, for admission checks against routes
    task_status: trio.TaskStatus[IngressHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    cfg = res.cfg
    smtp = cfg.smtp
    if listeners is None:
        listeners = [Listener(a) for a in smtp.listen]
        listeners += [Listener(a, implicit_tls=True) for a in smtp.tls_listen]
        listeners += [Listener(a, device=True) for a in smtp.device_listen]
    token = trio.lowlevel.current_trio_token()
    loop = uvloop.new_event_loop()
    server_tls = tls.ServerTls(cfg)
    gate = Gate(
        smtp.max_connections,
        max_per_ip=smtp.max_connections_per_ip,
        max_session_duration=smtp.max_session_duration,
        max_queue_depth=smtp.max_queue_depth,
        metrics=res.metrics,
    )
    guard = Guard(res, gate)
    commit_send, commit_recv = trio.open_memory_channel[bridge.Job](math.inf)
    committer = Committer(res, loop, on_accepted=guard.count_accepted)
    authenticator = Authenticator(res)
    hostname = smtp.effective_hostname()

    async with trio.open_nursery() as nursery:
        for _ in range(smtp.committers):
            nursery.start_soon(committer.run, commit_recv.clone())
        if smtp.max_queue_depth:
            await nursery.start(guard.run_backlog_monitor)
        nursery.start_soon(_give_back_memory, gate)
        handler = IngressHandler(
            commit=bridge.Portal(loop, token, bridge.channel_sink(commit_send)),
            calls=bridge.Portal(loop, token, bridge.call_sink(nursery, loop)),
            authenticate=authenticator.verify,
            max_recipients=smtp.max_recipients,
            gate=gate,
            mail_check=guard.mail,
            check_header_from=smtp.check_header_from,
            directory=directory,
        )

        def admit_device(ip: str) -> Device | None:
            return directory.snapshot.devices.admit(ip) if directory is not None else None

        def factory(ln: Listener) -> Callable[[], RelaySMTP]:
            implicit = ln.implicit_tls
            starttls = server_tls.device_context if ln.device else server_tls.context

            def make() -> RelaySMTP:
                return RelaySMTP(
                    handler,
                    gate=gate,
                    implicit_tls=implicit,
                    devices=admit_device if ln.device else None,
                    auth_requires_tls=not smtp.allow_plaintext_auth,
                    max_line_length=smtp.max_line_length,
                    min_data_rate=smtp.min_data_rate,
                    hostname=hostname,
                    ident="smtpproxy ESMTP",
                    tls_context=None if implicit else starttls,
                    data_size_limit=smtp.max_message_size,
                    enable_SMTPUTF8=True,
                    decode_data=False,
                    timeout=smtp.timeout,
                    loop=loop,
                )

            return make

        thread = IngressThread(
            loop,
            [
                (ln, factory(ln), server_tls.context if ln.implicit_tls else None)
                for ln in listeners
            ],
            gate,
            reuse_port=smtp.reuse_port,
        )
        bound = await trio.to_thread.run_sync(thread.start)
        for (host, port), ln in zip(bound, listeners, strict=False):
            logger.info("{} listening on {}:{}", ln.describe(), host, port)
            if ln.device and ipaddress.ip_address(host).is_unspecified:
                logger.warning(
                    "the device listener {}:{} takes connections on every interface: "
                    "firewall it so that only the device networks reach it",
                    host,
                    port,
                )
        task_status.started(IngressHandle(gate, bound, committer, authenticator, server_tls))
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(thread.stop)
                commit_send.close()
