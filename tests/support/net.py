"""Endpoints on 127.0.0.1 where nothing useful answers, for transport failure tests."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

HOST = "127.0.0.1"


def closed_port() -> int:
    """A TCP port on 127.0.0.1 where nothing listens (bound, then released): connecting
    is refused, and a server of the test's own can take it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def closed_port_url() -> str:
    """An http:// URL on 127.0.0.1 where nothing listens (connections are refused)."""
    return f"http://{HOST}:{closed_port()}"


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[str, list[trio.SocketStream]]]:
    """An http:// endpoint that accepts connections and never answers; yields (url, the
    connections accepted so far). They are closed on exit."""
    listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = listener.socket.getsockname()[1]
    held: list[trio.SocketStream] = []

    async def accept_and_stay_silent() -> None:
        while True:
            held.append(await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_and_stay_silent)
        try:
            yield f"http://{HOST}:{port}", held
        finally:
            nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listener.aclose()
