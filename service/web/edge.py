"""The HTTP edge: the limits a production server sets, in front of the app (SPEC section 3).

uvicorn parses HTTP but sets no limit on a request's head and no read timeout: a
100 MB header is buffered whole, a connection that never finishes its head or
its body is held forever, and every socket an attacker opens takes a file
descriptor until the process has none left. This protocol is uvicorn's
httptools one with those limits added, each answered in the one JSON error
shape with an X-Request-Id, like every other answer:

- a request line over MAX_REQUEST_LINE bytes: 414; a head (request line and
  headers) over MAX_HEAD bytes: 431. Counted before the parser sees the bytes,
  so a connection never holds more than one read (256 kB) beyond MAX_HEAD.
- the head must arrive within EdgeLimits.header_seconds of its first byte (a
  new connection must start one as soon), the body within body_seconds of the
  head: else 408 and the connection closes (slowloris, never-ending chunked
  bodies). A connection that never sent a byte is closed without an answer.
- a response the client does not take (its socket's buffers full) for
  body_seconds aborts the connection: a reader that never reads, or pipelines
  requests and never reads their answers, cannot hold a connection slot forever.
- a response sent before its request's body was all read says Connection: close
  and closes the connection, so an unread body can never keep it open.
- beyond EdgeLimits.max_connections open connections, a new one is answered
  503 unavailable with Retry-After and closed: descriptors stay for the ones in
  flight and for the database.
- at most MAX_PIPELINED requests may wait behind the one being answered: the
  parser reads a whole 256 kB read at once, and each request queued took a few
  kB (8,000 pipelined /ping per read, 20 connections: +480 MB); a connection
  past it is aborted (no client of this API pipelines; nginx never does).
- a request the parser refuses (NUL or control characters in a header, two
  Content-Lengths, Content-Length with Transfer-Encoding, an HTTP/2 preface) is
  a JSON 400 invalid_request rather than uvicorn's text page.

Idle keep-alive connections close after keep_alive_seconds (uvicorn's own
timer). What a front proxy should add is in ops/proxy/ and the README.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.core.codes import Code
from service.web.errors import RETRY_AFTER_SECONDS, STATUS

logger = logging.getLogger(__name__)

# nginx's large_client_header_buffers default (4 x 8 kB): a request line past
# 8 kB is no request of this API (the longest real one, /v1/audit with every
# filter, is under 1 kB).
MAX_REQUEST_LINE = 8 * 1024
# The whole head: a bearer token, a few ids and a proxy's X-Forwarded-For fit
# in 2 kB; 16 kB is h11's and Node's default and nginx's upper bound.
MAX_HEAD = 16 * 1024
# How long a connection over the limit may take to send its request head before
# it is answered 503: reading it first lets the client see the answer instead
# of a reset.
REFUSAL_READ_SECONDS = 1.0
# Requests queued on one connection behind the one being answered (see above).
MAX_PIPELINED = 16


class _PipelineTooDeep(Exception):
    """Raised inside the parser's callback: stops it parsing the rest of the read."""


@dataclasses.dataclass(frozen=True)
class EdgeLimits:
    """The tunable limits (from Settings); the sizes above are fixed."""

    max_connections: int
    header_seconds: float
    body_seconds: float


def protocol(limits: EdgeLimits) -> type[asyncio.Protocol]:
    """The uvicorn `http` protocol class that enforces `limits`."""

    class Guarded(GuardedProtocol):
        LIMITS = limits

    return Guarded


def error_bytes(
    code: Code, message: str, default_headers: list[tuple[bytes, bytes]], **extra: str
) -> bytes:
    """A complete HTTP/1.1 answer in the SPEC's error shape that closes the connection."""
    status = STATUS[code]
    body = json.dumps({"code": code, "message": message, "details": {}}).encode()
    headers = [
        *default_headers,
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", uuid.uuid4().hex.encode()),
        (b"connection", b"close"),
        *((k.replace("_", "-").lower().encode(), v.encode()) for k, v in extra.items()),
    ]
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return STATUS_LINE[status] + head + b"\r\n" + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head size limits, read timeouts and a connection cap."""

    LIMITS = EdgeLimits(max_connections=1000, header_seconds=10.0, body_seconds=10.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refused = False
        # "idle" (no byte of a request yet), "head", "body" (head parsed, body
        # arriving), "app" (request read; the app answers).
        self._phase = "idle"
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._line_done = False
        self._counting = True  # bytes arriving now belong to a request head
        self._tail = b""
        self._stall: asyncio.TimerHandle | None = None
        self._too_deep = False

    # -- connections over the cap -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.LIMITS.max_connections:
            self.transport = transport
            self._refused = True
            _warn_throttled("connection limit (%d) reached: answering 503", self.max_connections)
            self._arm(REFUSAL_READ_SECONDS)
            return
        super().connection_made(transport)
        self._arm(self.LIMITS.header_seconds)

    @property
    def max_connections(self) -> int:
        return self.LIMITS.max_connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_stall_timer()
        if self._refused:
            return
        super().connection_lost(exc)

    def _refuse_connection(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(
                error_bytes(
                    Code.UNAVAILABLE,
                    "this server has too many connections; retry",
                    self.server_state.default_headers,
                    retry_after=str(RETRY_AFTER_SECONDS),
                )
            )
            self.transport.close()

    # -- reading ------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # Discard the request; answer once its head is in (or the timer fires).
            if b"\r\n\r\n" in self._tail + data or len(data) >= MAX_HEAD:
                self._refuse_connection()
            self._tail = data[-3:]
            return
        if self._counting:
            if self._phase == "idle":
                self._phase = "head"
                self._arm(self.LIMITS.header_seconds)
            status = self._measure(data)
            if status is not None:
                self._answer_and_close(status)
                return
        super().data_received(data)

    def _measure(self, data: bytes) -> int | None:
        """Count the bytes of the head in `data`; 414 or 431 once past a limit."""
        end = (self._tail + data).find(b"\r\n\r\n")
        taken = len(data) if end < 0 else end + 4 - len(self._tail)
        if not self._line_done:
            newline = data.find(b"\n", 0, taken)
            if self._head_bytes + (taken if newline < 0 else newline) > MAX_REQUEST_LINE:
                return 414
            self._line_done = newline >= 0
        self._head_bytes += taken
        if self._head_bytes > MAX_HEAD:
            return 431
        if end >= 0:
            self._counting = False
            self._tail = b""
        else:
            self._tail = (self._tail + data)[-3:]
        return None

    def on_headers_complete(self) -> None:
        if len(self.pipeline) >= MAX_PIPELINED:
            self._too_deep = True
            raise _PipelineTooDeep  # the parser's error: send_400_response aborts
        self._phase = "body"
        self._arm(self.LIMITS.body_seconds)
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is previous:  # an upgrade: no request cycle was made
            return
        send = cycle.send

        async def send_closing_early(message: Any) -> None:
            # An answer started before the body was all read: say the connection
            # closes (uvicorn then closes it), since the rest of that body would be
            # read as the next request.
            if message["type"] == "http.response.start" and cycle.more_body:
                cycle.keep_alive = False
            await send(message)

        # run_asgi looks the method up when the task first runs, after this.
        cycle.send = send_closing_early  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        self._phase = "app"
        self._disarm()
        self._head_bytes, self._line_done, self._counting, self._tail = 0, False, True, b""
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # (An answer sent before its body was read has closed the connection: see
        # on_headers_complete.) With a pipelined request queued, the phase is already
        # that request's.
        if self._phase == "app" and not self.pipeline and not self.transport.is_closing():
            self._phase = "idle" if self._head_bytes == 0 else "head"
            if self._phase == "head":  # the next request's head is already arriving
                self._arm(self.LIMITS.header_seconds)
        super().on_response_complete()

    # -- answers of the edge itself -----------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        # The parser refused the bytes: no request to hand to the app.
        self._disarm()
        if self._too_deep:
            # Answers to the queued requests are still to come: a 400 now would be
            # read as the first one's. Nothing is owed to a client that floods.
            logger.info("edge: over %d pipelined requests: connection aborted", MAX_PIPELINED)
            self.transport.abort()
            return
        if not self.transport.is_closing():
            self.transport.write(
                error_bytes(
                    Code.INVALID_REQUEST,
                    "malformed HTTP/1.1 request",
                    self.server_state.default_headers,
                )
            )
            self.transport.close()

    def _answer_and_close(self, status: int) -> None:
        self._disarm()
        message = {
            408: "the request did not arrive in time",
            414: f"request line over {MAX_REQUEST_LINE} bytes",
            431: f"request head over {MAX_HEAD} bytes",
        }[status]
        code = {408: Code.REQUEST_TIMEOUT, 414: Code.URI_TOO_LONG, 431: Code.HEADERS_TOO_LARGE}[
            status
        ]
        logger.info("edge: %d %s", status, message)
        if self.cycle is not None and not self.cycle.response_complete:
            # The app is waiting for a body that will not come: it sees a disconnect.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:
                self.transport.close()
                return
        if not self.transport.is_closing():
            self.transport.write(error_bytes(code, message, self.server_state.default_headers))
            self.transport.close()

    # -- the write timer: a client that stops reading ---------------------------------------

    def pause_writing(self) -> None:
        # The transport's buffer is over its high-water mark: the client is not
        # reading. Without a limit the answer (and the connection) would wait forever.
        super().pause_writing()
        self._stop_stall_timer()
        self._stall = self.loop.call_later(self.LIMITS.body_seconds, self._stalled)

    def resume_writing(self) -> None:
        self._stop_stall_timer()
        super().resume_writing()

    def _stop_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        logger.info(
            "edge: a response untaken for %.0f s: connection aborted", self.LIMITS.body_seconds
        )
        # abort, not close: close would wait for the buffer to drain, which never comes.
        self.transport.abort()

    # -- the read timer -----------------------------------------------------------------

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._refused:
            self._refuse_connection()
        elif self._phase == "idle":
            self.transport.close()  # never sent a byte: nobody to answer
        elif self._phase in ("head", "body"):
            self._answer_and_close(408)


_last_warning = 0.0


def _warn_throttled(message: str, *args: object) -> None:
    # Under a flood every refused connection would log a line: one every 10 s says enough.
    global _last_warning
    now = time.monotonic()
    if now - _last_warning >= 10.0:
        _last_warning = now
        logger.warning(message, *args)
