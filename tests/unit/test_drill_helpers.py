"""The partition drill's own instruments: the fault-injecting link (over real sockets to an
echo server) and the lease log's checker. A drill whose proxy did not cut, or whose checker
could not see two holds at once, would pass whatever the service did."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.helpers.faultproxy import DOWN, UP, Link, fault_net
from tests.helpers.leaselog import lease_findings

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1; its port."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(timeout=5)
    server.close()


@pytest.fixture
def link(echo_port: int) -> Iterator[Link]:
    with fault_net(seed=7) as net:
        yield net.link("test", echo_port)


def connect(link: Link, timeout: float = 2.0) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", link.port), timeout=timeout)
    return conn


def echo(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    return conn.recv(4096)


def test_a_healthy_link_carries_bytes_both_ways(link: Link) -> None:
    """Bytes sent through a link come back from the echo server unchanged."""
    with connect(link) as conn:
        assert b"hello" == echo(conn, b"hello")


def test_a_hung_link_holds_bytes_and_delivers_them_on_heal(link: Link) -> None:
    """While hung nothing comes back (the connection stays open); healed, what was sent
    arrives, as TCP's retransmissions would deliver it."""
    with connect(link, timeout=0.5) as conn:
        assert b"a" == echo(conn, b"a")
        link.hang()
        conn.sendall(b"held")
        with pytest.raises(TimeoutError):
            conn.recv(4096)
        link.heal()
        conn.settimeout(2)
        assert b"held" == conn.recv(4096)


def test_a_reset_link_resets_open_and_new_connections_until_healed(link: Link) -> None:
    """reset() answers every open connection and every new one with RST; heal() lets new
    connections through again."""
    with connect(link) as conn:
        assert b"x" == echo(conn, b"x")
        link.reset()
        with pytest.raises(ConnectionResetError):
            echo(conn, b"y")
    # The RST may reach a new connection while it is still connecting (a loaded machine)
    # or at its first exchange: either way it is refused.
    with pytest.raises(ConnectionResetError), connect(link) as fresh:
        echo(fresh, b"z")
    link.heal()
    with connect(link) as again:
        assert b"ok" == echo(again, b"ok")


def test_a_delayed_link_answers_no_sooner_than_twice_the_delay(link: Link) -> None:
    """delay(d) holds each chunk d seconds in each direction: an echo takes at least 2d."""
    link.delay(0.2)
    with connect(link) as conn:
        began = time.monotonic()
        assert b"slow" == echo(conn, b"slow")
        assert 0.4 <= time.monotonic() - began


@pytest.mark.parametrize("direction", [UP, DOWN])
def test_a_one_way_stall_holds_that_direction_only_until_healed(link: Link, direction: str) -> None:
    """stall(direction) stops one direction: the echo does not come back until heal()."""
    with connect(link, timeout=0.5) as conn:
        link.stall(direction)
        conn.sendall(b"one-way")
        with pytest.raises(TimeoutError):
            conn.recv(4096)
        link.heal()
        conn.settimeout(2)
        assert b"one-way" == conn.recv(4096)


def test_a_hook_fires_once_when_its_pattern_goes_up(link: Link) -> None:
    """on_up(pattern, action) calls action when a client-to-server chunk holds the pattern,
    and only once."""
    fired: list[int] = []
    link.on_up(b"POST /v1/payouts ", lambda: fired.append(1))
    with connect(link) as conn:
        echo(conn, b"GET /v1/balances ")
        assert [] == fired
        echo(conn, b"POST /v1/payouts HTTP/1.1")
        echo(conn, b"POST /v1/payouts HTTP/1.1")
    assert [1] == fired


def entry(lease: str, event: str, seconds: float, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "lease": lease,
        "event": event,
        "at": T0 + timedelta(seconds=seconds),
        "port": port,
        "holder": extra.get("holder"),
        "until": extra.get("until") and T0 + timedelta(seconds=extra["until"]),
    }


HOSTS = {1: "host0", 2: "host1"}


def test_a_take_while_another_host_holds_an_unexpired_lease_is_an_overlap() -> None:
    """A take at 3 s of a lease held by another host until 5 s is reported; a take after
    the first hold expired or was released is not."""
    log = [
        entry("scan", "take", 0, 1, holder="a", until=5),
        entry("scan", "take", 3, 2, holder="b", until=8),
        entry("scan", "release", 4, 2, holder="b"),
        entry("scan", "take", 5, 1, holder="c", until=10),
        entry("scan", "take", 11, 2, holder="d", until=16),
    ]
    found = lease_findings(log, lambda port, at: HOSTS.get(port or 0))
    assert 1 == len(found.overlaps)
    assert "host1 took it at" in found.overlaps[0]
    assert {"scan": 4} == found.takes


def test_an_act_by_a_host_whose_hold_expired_is_reported_and_one_within_it_is_not() -> None:
    """An act inside the actor's own hold passes; one after that hold's deadline (another
    host holding the lease by then) is reported."""
    log = [
        entry("webhook", "take", 0, 1, holder="a", until=5),
        entry("webhook", "act", 1, 1),
        entry("webhook", "take", 6, 2, holder="b", until=12),
        entry("webhook", "act", 7, 1),
        entry("webhook", "act", 8, 2),
    ]
    found = lease_findings(log, lambda port, at: HOSTS.get(port or 0))
    assert 1 == len(found.outside)
    assert "host0 acted at" in found.outside[0]
    assert [] == found.overlaps
    assert {"webhook": 3} == found.acts
