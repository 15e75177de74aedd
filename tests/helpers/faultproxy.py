"""Fault-injecting TCP links for the partition drill: one proxy per host and per link
(to PostgreSQL, to Billing) on 127.0.0.1, all on one asyncio loop in a thread of the test.

What a link can be made to do, and what it models:

- `hang()`: a partition where packets vanish. Nothing moves either way; new connections
  are accepted but not carried on (a SYN retransmitted into the void). TCP retransmits what
  was sent, so on `heal()` the held bytes are delivered, in order, to whoever still listens.
- `reset()`: a partition a firewall answers: every connection is reset (RST) at once and
  each new one is reset on arrival, until `heal()`.
- `delay(seconds)`: every chunk reaches the other side this much later, order kept.
- `loss(share, stall)`: TCP hides loss behind retransmission, so a lost segment is seen
  by the application as a stall: each chunk, with probability `share`, holds its direction
  (it and everything behind it) for `stall` seconds, as a retransmission timeout would.
- `stall(direction)`: one direction ("up", client to server, or "down") held, the other
  flowing: an asymmetric partition. `heal()` delivers what was held.

`heal()` returns a link to plain forwarding. `on_up(pattern, action)` calls `action` on the
loop's thread when a client-to-server chunk holding `pattern` passes (a drill uses it to cut
a host from PostgreSQL just after its order left for Billing). Each link records the local
ports of its upstream connections, so a server-side log (`inet_client_port()`) can tell which
host a session belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

UP, DOWN = "up", "down"
CHUNK = 65536
# Closing with SO_LINGER on and a zero timeout sends RST instead of FIN.
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class _Pipe:
    """One direction of one connection: chunks queued with their arrival time, written
    out in order once the link lets them."""

    writer: asyncio.StreamWriter
    queue: asyncio.Queue[tuple[float, bytes | None]] = field(default_factory=asyncio.Queue)


@dataclass
class _Upstream:
    port: int
    opened: float
    closed: float | None = None


@dataclass(eq=False)  # kept in a set: identity, not value
class _Conn:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    upstream: _Upstream | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def closed(self) -> None:
        if self.upstream is not None and self.upstream.closed is None:
            self.upstream.closed = time.time()


def _rst(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class Link:
    """One host's link to one upstream (PostgreSQL or Billing); see the module docstring."""

    def __init__(self, net: FaultNet, name: str, upstream_port: int, seed: int) -> None:
        self.net = net
        self.name = name
        self.upstream_port = upstream_port
        self.port = 0
        self.rng = random.Random(seed)
        self.mode = "ok"
        self.extra_delay = 0.0
        self.loss_share = 0.0
        self.loss_stall = 0.0
        self.flowing = {UP: asyncio.Event(), DOWN: asyncio.Event()}
        for event in self.flowing.values():
            event.set()
        self.conns: set[_Conn] = set()
        # Each upstream connection's local port, and when (wall clock, the machine's: the
        # same clock a local server's clock_timestamp() reads) it was opened and closed.
        self.upstream: list[_Upstream] = []
        self.hooks: list[tuple[bytes, Callable[[], None]]] = []
        self.server: asyncio.Server | None = None

    # --- control, from the loop's thread -------------------------------------------------

    def _set(self, mode: str, *, up: bool, down: bool) -> None:
        self.mode = mode
        for direction, flows in ((UP, up), (DOWN, down)):
            if flows:
                self.flowing[direction].set()
            else:
                self.flowing[direction].clear()

    def _heal(self) -> None:
        self.extra_delay = self.loss_share = self.loss_stall = 0.0
        self._set("ok", up=True, down=True)

    def _hang(self) -> None:
        self._set("hang", up=False, down=False)

    def _reset(self) -> None:
        self._set("reset", up=True, down=True)
        for conn in list(self.conns):
            self._drop(conn)

    def _stall(self, direction: str) -> None:
        self._set(f"stall-{direction}", up=direction != UP, down=direction != DOWN)

    def _drop(self, conn: _Conn) -> None:
        conn.closed()
        for task in conn.tasks:
            task.cancel()
        _rst(conn.client)
        _rst(conn.server)
        self.conns.discard(conn)

    # --- control, from the test's thread -------------------------------------------------

    def heal(self) -> None:
        self.net.call(self._heal)

    def hang(self) -> None:
        self.net.call(self._hang)

    def reset(self) -> None:
        self.net.call(self._reset)

    def stall(self, direction: str) -> None:
        assert direction in (UP, DOWN), direction
        self.net.call(self._stall, direction)

    def delay(self, seconds: float) -> None:
        def apply() -> None:
            self.extra_delay = seconds

        self.net.call(apply)

    def loss(self, share: float, stall: float) -> None:
        def apply() -> None:
            self.loss_share, self.loss_stall = share, stall

        self.net.call(apply)

    def on_up(self, pattern: bytes, action: Callable[[], None]) -> None:
        """Once: call `action` (on the loop) when a client-to-server chunk holds `pattern`."""
        self.net.call(self.hooks.append, (pattern, action))

    def disarm(self) -> None:
        self.net.call(self.hooks.clear)

    def had_port(self, port: int, at: float, slack: float = 1.0) -> bool:
        """Whether one of this link's upstream connections used `port` at `at` (wall clock)."""
        return any(
            u.port == port
            and u.opened - slack <= at
            and (u.closed is None or at <= u.closed + slack)
            for u in list(self.upstream)
        )

    # --- the proxy -----------------------------------------------------------------------

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        if self.mode == "reset":
            _rst(writer)
            return
        self.conns.add(conn)
        try:
            # A connection opened during a hang waits for the link, as a SYN would.
            await self.flowing[UP].wait()
            await self.flowing[DOWN].wait()
            if self.mode == "reset":
                raise ConnectionResetError
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except (OSError, asyncio.CancelledError):
            # Upstream down (PostgreSQL restarting): the client sees the refusal as a reset.
            self._drop(conn)
            return
        conn.server = up_writer
        conn.upstream = _Upstream(up_writer.get_extra_info("sockname")[1], time.time())
        self.upstream.append(conn.upstream)
        up = _Pipe(up_writer)
        down = _Pipe(writer)
        loop = asyncio.get_running_loop()
        conn.tasks = [
            loop.create_task(self._read(reader, up, UP)),
            loop.create_task(self._write(conn, up, UP)),
            loop.create_task(self._read(up_reader, down, DOWN)),
            loop.create_task(self._write(conn, down, DOWN)),
        ]

    async def _read(self, reader: asyncio.StreamReader, pipe: _Pipe, direction: str) -> None:
        try:
            while chunk := await reader.read(CHUNK):
                if direction == UP:
                    for hook in [h for h in self.hooks if h[0] in chunk]:
                        self.hooks.remove(hook)
                        hook[1]()
                pipe.queue.put_nowait((time.monotonic(), chunk))
        except OSError:
            pass
        pipe.queue.put_nowait((time.monotonic(), None))  # end of stream, in its place

    async def _write(self, conn: _Conn, pipe: _Pipe, direction: str) -> None:
        released = 0.0
        try:
            while True:
                arrived, chunk = await pipe.queue.get()
                due = max(arrived + self.extra_delay, released)
                if self.loss_share and self.rng.random() < self.loss_share:
                    due = max(due, time.monotonic()) + self.loss_stall
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self.flowing[direction].wait()
                released = time.monotonic()
                if chunk is None:
                    conn.closed()  # one side is done: the session is over
                    if pipe.writer.can_write_eof():
                        pipe.writer.write_eof()
                    return
                pipe.writer.write(chunk)
                await pipe.writer.drain()
        except OSError:
            self._drop(conn)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            self._drop(conn)


class FaultNet:
    """Every link of a drill, on one event loop in a daemon thread."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.links: list[Link] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="faultnet", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn` on the loop and wait for it (control from the test's thread)."""
        done: Future[None] = Future()

        def run() -> None:
            try:
                fn(*args)
                done.set_result(None)
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        if threading.current_thread() is self._thread:
            fn(*args)
            return
        self.loop.call_soon_threadsafe(run)
        done.result(timeout=10)

    def link(self, name: str, upstream_port: int) -> Link:
        """A new link to 127.0.0.1:`upstream_port`, listening on a port of its own."""
        link = Link(self, name, upstream_port, seed=zlib.crc32(f"{self.seed}:{name}".encode()))
        asyncio.run_coroutine_threadsafe(link.start(), self.loop).result(timeout=10)
        self.links.append(link)
        return link

    def stop(self) -> None:
        for link in self.links:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(link.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


@contextlib.contextmanager
def fault_net(seed: int) -> Iterator[FaultNet]:
    net = FaultNet(seed)
    net.start()
    try:
        yield net
    finally:
        net.stop()
