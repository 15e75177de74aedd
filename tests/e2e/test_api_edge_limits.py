"""The HTTP edge of a real `serve` over TCP: what an attacker without a token can do to it.

Raw sockets, because the attacks are what no HTTP client sends: heads that never end,
bodies that trickle forever, malformed framing, thousands of idle sockets (issue 17
items 1, 2 and 8).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, TEMPLATE, create_database, drop_database, service_env
from tests.helpers.procs import Proc, cluster, wait_for

pytestmark = pytest.mark.e2e

# Short read timeouts, so the tests wait seconds, not the production ten.
TIMEOUTS = {"API_HEADER_TIMEOUT_SECONDS": "1", "API_BODY_TIMEOUT_SECONDS": "1"}


@pytest.fixture(scope="module")
def served(
    pg_server_url: str,
    template_url: str,
    emulator_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, Proc]]:
    """One real `serve` for the module, with one-second read timeouts."""
    url = create_database(pg_server_url, template=TEMPLATE)
    try:
        env = service_env(url, emulator_url, API_DRAIN_SECONDS="0", **TIMEOUTS)
        with cluster(env, tmp_path_factory.mktemp("edge")) as c:
            api = c.api()
            yield api, c.procs[-1]
    finally:
        drop_database(pg_server_url, url)


def address(api: str) -> tuple[str, int]:
    parts = urlsplit(api)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


@contextlib.contextmanager
def connect(api: str, timeout: float = 10.0) -> Iterator[socket.socket]:
    sock = socket.create_connection(address(api), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Read until the server closes: status, headers (lower-case) and the JSON body."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, json.loads(body)


def send_until_closed(sock: socket.socket, head: bytes, filler: bytes, total: int) -> int:
    """Send `head`, then `filler` up to `total` bytes or until the server stops reading."""
    sent = 0
    with contextlib.suppress(OSError):
        sock.sendall(head)
        while sent < total:
            sock.sendall(filler)
            sent += len(filler)
    return sent


def rss_mb(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_five_never_finished_100_mb_headers_take_no_memory(served: tuple[str, Proc]) -> None:
    """Five connections each sending a header of up to 100 MB are answered 431
    headers_too_large (JSON, with X-Request-Id) after 16 kB, and the API's memory stays
    within a few MB of where it was."""
    api, proc = served
    before = rss_mb(proc)
    answers: list[tuple[int, str, str]] = []
    sent: list[int] = []

    def attack() -> None:
        with connect(api) as sock:
            sent.append(
                send_until_closed(sock, b"GET /ping HTTP/1.1\r\nX-Big: ", b"a" * 65536, 100 << 20)
            )
            status, headers, body = read_answer(sock)
            answers.append((status, body["code"], headers.get("x-request-id", "")))

    threads = [threading.Thread(target=attack) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [(431, "headers_too_large")] * 5 == [(s, c) for s, c, _ in answers]
    assert all(rid for _, _, rid in answers)
    assert max(sent) < 100 << 20, "the server kept reading the whole header"
    assert rss_mb(proc) - before < 30
    assert 200 == httpx.get(f"{api}/ping", timeout=5).status_code


def test_a_100_mb_query_string_is_a_prompt_414(served: tuple[str, Proc]) -> None:
    """A request line of up to 100 MB is answered 414 uri_too_long after 8 kB, in well under
    a second, while /ping keeps answering at once."""
    api, _ = served
    with connect(api) as sock:
        started = time.monotonic()
        send_until_closed(sock, b"GET /v1/audit?q=", b"a" * 65536, 100 << 20)
        status, _, body = read_answer(sock)
        took = time.monotonic() - started
    assert (414, "uri_too_long") == (status, body["code"])
    assert took < 2.0
    ping = time.monotonic()
    assert 200 == httpx.get(f"{api}/ping", timeout=5).status_code
    assert time.monotonic() - ping < 1.0


def test_a_trickling_head_is_cut_with_408(served: tuple[str, Proc]) -> None:
    """A head that has not ended one header timeout after its first byte (slowloris) is
    answered 408 request_timeout and the connection closed."""
    api, _ = served
    with connect(api) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        status, headers, body = read_answer(sock)
    assert (408, "request_timeout") == (status, body["code"])
    assert "x-request-id" in headers
    assert time.monotonic() - started < 5.0


def test_a_connection_that_never_speaks_is_closed(served: tuple[str, Proc]) -> None:
    """A connection that sends nothing is closed after the header timeout, without an answer."""
    api, _ = served
    with connect(api) as sock:
        started = time.monotonic()
        assert b"" == sock.recv(100)
    assert time.monotonic() - started < 5.0


def test_a_never_ending_chunked_body_is_cut_with_408(served: tuple[str, Proc]) -> None:
    """An authenticated PUT whose chunked body never ends (a chunk every 0.1 s) is answered
    408 within about the body timeout, the connection closed; the attacker's thread stops
    as soon as the server does."""
    api, _ = served
    with connect(api) as sock:
        sock.sendall(
            b"PUT /v1/parks/p1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"X-User-Id: admin-1\r\nAuthorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n\r\n"
        )
        stop = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.1):
                    sock.sendall(b"1\r\n \r\n")

        t = threading.Thread(target=trickle)
        t.start()
        started = time.monotonic()
        try:
            status, _, body = read_answer(sock)
        finally:
            stop.set()
            t.join()
    assert (408, "request_timeout") == (status, body["code"])
    assert time.monotonic() - started < 5.0


def test_an_answer_before_the_body_ends_closes_the_connection(served: tuple[str, Proc]) -> None:
    """A request refused before its body is read (401, no token) is answered, and the
    connection closed rather than kept open by the endless body that follows."""
    api, _ = served
    with connect(api) as sock:
        sock.sendall(
            b"POST /v1/payouts/instant HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1\r\n{\r\n"
        )
        status, headers, body = read_answer(sock)
    assert (401, "unauthorized", "close") == (status, body["code"], headers.get("connection"))


MALFORMED = {
    "nul-in-header": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "control-char-in-header": b"GET /ping HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n",
    "two-content-lengths": (
        b"POST /v1/payouts/instant HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}"
    ),
    "content-length-and-chunked": (
        b"POST /v1/payouts/instant HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "http2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_protocol_errors_are_json_with_a_request_id(served: tuple[str, Proc], raw: bytes) -> None:
    """What the HTTP parser refuses is answered 400 invalid_request in the SPEC's JSON shape,
    with X-Request-Id, not a text/plain page."""
    api, _ = served
    with connect(api) as sock:
        sock.sendall(raw)
        status, headers, body = read_answer(sock)
    assert (400, "invalid_request", "application/json") == (
        status,
        body["code"],
        headers.get("content-type"),
    )
    assert headers.get("x-request-id")


def test_connections_over_the_cap_are_answered_503(
    pg_server_url: str, template_url: str, emulator_url: str, tmp_path: Path
) -> None:
    """With API_MAX_CONNECTIONS open (idle) connections, one more is answered 503
    unavailable with Retry-After instead of taking a descriptor; once they go, requests are
    served again."""
    url = create_database(pg_server_url, template=TEMPLATE)
    env = service_env(url, emulator_url, API_MAX_CONNECTIONS="20")
    with (
        contextlib.closing(_Dropper(pg_server_url, url)),
        cluster(env, tmp_path) as c,
        contextlib.ExitStack() as idle,
    ):
        api = c.api()
        socks = [idle.enter_context(connect(api)) for _ in range(20)]
        for sock in socks:  # each has started a request: the server has surely accepted it
            sock.sendall(b"GET /ping HTTP/1.1\r\n")
        with connect(api) as sock:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_answer(sock)
        assert (503, "unavailable") == (status, body["code"])
        assert headers.get("retry-after")
        idle.close()
        wait_for(
            lambda: httpx.get(f"{api}/ping", timeout=2).status_code == 200,
            timeout=10,
            what="served again once the idle connections closed",
        )


class _Dropper:
    """Drops a test database on close (this module makes its own: see `served`)."""

    def __init__(self, server_url: str, url: str) -> None:
        self.server_url, self.url = server_url, url

    def close(self) -> None:
        drop_database(self.server_url, self.url)


def test_pipelined_requests_are_all_answered_and_the_connection_kept(
    served: tuple[str, Proc],
) -> None:
    """Two requests in one write (HTTP/1.1 pipelining) are both answered 200, in order, and
    the connection stays open for a third: the edge's bookkeeping follows each request."""
    api, _ = served
    with connect(api) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\nGET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += sock.recv(65536)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, _, _ = read_answer(sock)
    assert 2 == data.count(b"HTTP/1.1 200")
    assert 200 == status


def test_clients_that_never_read_their_answers_do_not_hold_the_connection_cap(
    pg_server_url: str, template_url: str, emulator_url: str, tmp_path: Path
) -> None:
    """API_MAX_CONNECTIONS connections that pipeline 200 requests for /openapi.json (10 MB of
    answers, more than the sockets' buffers) and never read an answer are aborted, so /ping
    is served again while the attacker still holds its sockets (a slow reader held its
    connection, and the cap, forever). Past MAX_PIPELINED the edge aborts them at once;
    within it, an answer stalled for API_BODY_TIMEOUT_SECONDS does."""
    url = create_database(pg_server_url, template=TEMPLATE)
    env = service_env(url, emulator_url, API_MAX_CONNECTIONS="20", **TIMEOUTS)
    with (
        contextlib.closing(_Dropper(pg_server_url, url)),
        cluster(env, tmp_path) as c,
        contextlib.ExitStack() as readers,
    ):
        api = c.api()
        for _ in range(20):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address(api))
            readers.callback(sock.close)
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 200)

        def pinged() -> bool:
            try:
                return httpx.get(f"{api}/ping", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(pinged, timeout=20, what="/ping served while the slow readers keep their sockets")


def test_a_deep_pipeline_takes_no_memory(served: tuple[str, Proc]) -> None:
    """Twenty connections each sending 8,000 pipelined requests for /ping in one write are
    closed by the server, the API's memory stays within 30 MB of where it was, and /ping
    answers (each request queued took a few kB: +480 MB, the connections kept)."""
    api, proc = served
    before = rss_mb(proc)
    with contextlib.ExitStack() as floods:
        socks = [floods.enter_context(connect(api, timeout=10)) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n" * 8000)
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):  # a timeout here: the server kept the connection
                    pass
        assert rss_mb(proc) - before < 30
    assert 200 == httpx.get(f"{api}/ping", timeout=5).status_code
