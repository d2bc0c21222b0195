"""`smtpproxy run`: open resources, start every service in one nursery, shut down cleanly.

Start-up order: resources, migrations, routing snapshot, then the services; `serve`
reports ready (task_status) only when the SMTP listeners and the health endpoint are
bound. Shutdown (the stop event, set by SIGTERM/SIGINT): readiness says "draining", new
SMTP sessions get 421, DATA in progress and deliveries in flight get until
delivery.shutdown_grace to finish, then everything is cancelled. Deliveries cut off
then stay pending on the stream and are taken over by another instance (or this one
after a restart) once this one has left the liveness registry for a heartbeat lifetime.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from functools import partial

import attrs
import trio
from loguru import logger

from smtpproxy.config import Config, HostPort
from smtpproxy.db import migrate
from smtpproxy.delivery import directory
from smtpproxy.delivery.consumer import Consumer, consumer_name
from smtpproxy.delivery.directory import DirectoryHolder
from smtpproxy.delivery.retry import RetryPolicy
from smtpproxy.delivery.scheduler import run_checker, run_reconciler, run_scheduler
from smtpproxy.errors import DatabaseUnavailable
from smtpproxy.ingress.gate import Gate
from smtpproxy.ingress.server import IngressHandle, run_ingress
from smtpproxy.observe.health import HealthState, run_health
from smtpproxy.observe.scrape import Scraper
from smtpproxy.runtime.reload import run_reload
from smtpproxy.runtime.resources import Resources, open_resources
from smtpproxy.runtime.supervise import Backoff, supervise
from smtpproxy.runtime.workers import (
    Role,
    Workers,
    delivers_here,
    primary_exited,
    report_ready,
    worker_roles,
)

PRIMARY = Role()


@attrs.frozen
class Running:
    smtp: list[tuple[str, int]]
    health: tuple[str, int] | None
    reload_tls: Callable[[], Awaitable[None]] = attrs.field(repr=False, default=None)


def retry_policy(cfg: Config) -> RetryPolicy:
    d = cfg.delivery
    return RetryPolicy(schedule=d.retry_schedule, max_attempts=d.max_attempts, max_age=d.max_age)


async def _wait_for_database(res: Resources) -> None:
    """Apply migrations, waiting (and saying so) while PostgreSQL is unreachable."""
    backoff = Backoff(1.0, 30.0)
    while True:
        try:
            applied = await trio.to_thread.run_sync(
                partial(
                    migrate.migrate, res.db.url, connect_timeout=res.cfg.database.connect_timeout
                )
            )
        except DatabaseUnavailable as exc:
            wait = backoff.next()
            logger.warning("waiting for PostgreSQL ({}); retrying in {:.0f} s", exc, wait)
            await trio.sleep(wait)
            continue
        for mig in applied:
            logger.info("applied migration {:03d}_{}", mig.version, mig.name)
        return


def _health_checks(res: Resources) -> dict[str, object]:
    async def postgresql() -> None:
        await trio.to_thread.run_sync(res.db.ping, abandon_on_cancel=True)

    async def redis() -> None:
        await trio.to_thread.run_sync(res.streams.ping, abandon_on_cancel=True)

    async def store() -> None:
        await trio.to_thread.run_sync(res.store.check, abandon_on_cancel=True)

    return {"postgresql": postgresql, "redis": redis, "store": store}


def _backlog_check(gate: Gate) -> Callable[[], Awaitable[None]]:
    async def queue() -> None:
        if gate.overloaded:
            raise RuntimeError(
                f"delivery backlog {gate.backlog} is over smtp.max_queue_depth "
                f"{gate.max_queue_depth}: new mail gets 421"
            )

    return queue


def banner(cfg: Config) -> None:
    where = f"config {cfg.source}" if cfg.source else "built-in defaults (no config file found)"
    logger.info("smtpproxy starting with {}", where)
    if cfg.uses_embedded:
        logger.warning(
            "using the embedded PostgreSQL/Redis under {} (fine for trying smtpproxy out). "
            "For production set database.url and redis.url in smtpproxy.toml to real servers.",
            cfg.data_dir,
        )
    if cfg.delivery.default_route:
        logger.info(
            "messages no routing rule matches go to provider {!r}", cfg.delivery.default_route
        )


async def _start_delivery(
    nursery: trio.Nursery, res: Resources, consumer: Consumer, role: Role, delivers: bool
) -> None:
    """The consumer in every process that delivers (workers.delivers_here); the
    scheduler, reconciler and storage check in the primary only."""
    if not res.cfg.delivery.enabled:
        logger.info("delivery.enabled = false: this instance only accepts mail")
        return
    if delivers:
        await nursery.start(supervise, "consumer", consumer.run)
    if role.primary:
        await nursery.start(supervise, "scheduler", lambda: run_scheduler(res))
        await nursery.start(supervise, "reconciler", lambda: run_reconciler(res))
        await nursery.start(supervise, "storage-check", lambda: run_checker(res))


async def serve(
    cfg: Config,
    stop: trio.Event,
    *,
    role: Role = PRIMARY,
    workers: Workers | None = None,
    task_status: trio.TaskStatus[Running] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until stop is set, then drain. The primary (the only process unless
    run.processes > 1 or run.delivery_processes > 0) also runs the scheduler, the
    reconciler and the storage check; a delivery process (role.delivery_only) has no
    SMTP listener."""
    banner(cfg)
    res = await trio.to_thread.run_sync(open_resources, cfg)
    pool = directory.ProviderPool()
    try:
        await _wait_for_database(res)
        holder = DirectoryHolder(await res.db.run(lambda conn: directory.load(conn, cfg, res.box)))
        health = HealthState(checks=_health_checks(res))  # type: ignore[arg-type]
        consumer = Consumer(res, holder, pool, name=consumer_name(0), policy=retry_policy(cfg))
        forget: list[Callable[[], None]] = []  # told when the configuration changes
        async with trio.open_nursery() as nursery:
            await nursery.start(
                supervise,
                "config-reload",
                lambda: run_reload(res, holder, pool, subscribers=forget),
            )
            ingress = None
            if not role.delivery_only:
                ingress = await nursery.start(partial(run_ingress, res, directory=holder))
                forget.append(ingress.authenticator.forget)
                health.checks["queue"] = _backlog_check(ingress.gate)
            scraper = Scraper(res, ingress.gate if ingress else None, consumer.health)
            health.metrics, health.process_metrics = scraper.render, scraper.render_local
            if workers is not None:
                health.checks["workers"] = workers.check
                scraper.others = workers.metrics
            delivers = delivers_here(role, cfg, workers)
            await _start_delivery(nursery, res, consumer, role, delivers)
            health_bound = None
            if cfg.health.listen:
                health_bound = await nursery.start(
                    run_health, HostPort.parse(cfg.health.listen), health
                )
            health.listening = True
            task_status.started(
                Running(
                    smtp=ingress.bound if ingress else [],
                    health=health_bound,
                    reload_tls=ingress.reload_tls if ingress else _no_tls,
                )
            )
            if not role.primary:  # logged before the primary hears it, so it comes first
                logger.info("worker {} ready", role.index)
            elif workers is None:
                logger.info("smtpproxy ready")
            if health_bound is not None:
                report_ready(role, health_bound[1])

            await stop.wait()
            logger.info("shutting down: draining for up to {:.0f} s", cfg.delivery.shutdown_grace)
            health.draining = True
            await _drain(cfg, ingress, consumer)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await pool.aclose()
            await trio.to_thread.run_sync(res.close)
    logger.info("smtpproxy stopped")


async def _drain(cfg: Config, ingress: IngressHandle | None, consumer: Consumer) -> None:
    """New sessions get 421; DATA in progress and deliveries in flight get until
    delivery.shutdown_grace to finish."""
    if ingress:
        ingress.begin_drain()
    consumer.stopping = True
    with trio.move_on_after(cfg.delivery.shutdown_grace) as scope:
        if ingress:
            await ingress.wait_data_done()
        await consumer.wait_idle()
    if scope.cancelled_caught:
        logger.warning("grace period over: in-flight deliveries are left to be reclaimed")


async def _no_tls() -> None:
    """SIGHUP in a process without SMTP listeners: no certificate to reload."""


async def run_until_signalled(cfg: Config, role: Role = PRIMARY) -> None:
    """The main of `smtpproxy run`: serve until SIGTERM or SIGINT; SIGHUP reloads the
    TLS certificate without dropping sessions. cfg is this process's (process_config).
    With run.processes > 1 the primary starts the workers once it is ready (migrations
    applied), passes signals on to them and stops them with itself (workers.py)."""
    workers = Workers(cfg) if role.primary and worker_roles(cfg) else None
    stop = trio.Event()
    started: list[Running] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for signum in signals:
                    logger.info("received {}", signal.Signals(signum).name)
                    if signum == signal.SIGHUP:
                        if workers is not None:
                            workers.signal(signum)
                        if started:
                            await started[0].reload_tls()
                        continue
                    stop.set()
                    if not started:  # still starting (e.g. waiting for PostgreSQL): give up
                        nursery.cancel_scope.cancel()
                    return

            async def on_primary_exit() -> None:  # in a worker
                await primary_exited(role)
                logger.warning("the primary process exited: stopping")
                stop.set()
                if not started:
                    nursery.cancel_scope.cancel()

            async def until_stopped() -> None:
                """What can stop this process, watched until one of them does."""
                async with trio.open_nursery() as watching:
                    watching.start_soon(on_signals)
                    if not role.primary:
                        watching.start_soon(on_primary_exit)
                    await stop.wait()
                    watching.cancel_scope.cancel()

            nursery.start_soon(until_stopped)
            started.append(
                await nursery.start(partial(serve, cfg, stop, role=role, workers=workers))
            )
            if workers is not None:
                await nursery.start(workers.run)
                logger.info("smtpproxy ready")  # and every worker with it
            await stop.wait()
            if workers is not None:
                await workers.stop()  # while serve() drains this process
        # serve() drained and returned; nothing else to wait for
