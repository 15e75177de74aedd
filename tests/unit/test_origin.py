"""service/web/origin.py: the client address, X-Forwarded-For believed only from trusted proxies."""

from __future__ import annotations

import ipaddress

import pytest
from starlette.requests import Request

from service.web.origin import client_details
from tests.conftest import make_settings

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def request(peer: str | None, headers: dict[str, str]) -> Request:
    settings = make_settings("postgresql://unused/db", trusted_proxies=PROXIES)
    return Request(
        {
            "type": "http",
            "method": "POST",
            "path": "/",
            "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers.items()],
            "client": (peer, 5000) if peer else None,
            "state": {"settings": settings},
        }
    )


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.5", None, "203.0.113.5"),
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.0.0.9", "198.51.100.1"),
        ("10.0.0.2", "198.51.100.1, not-an-ip", "10.0.0.2"),
        ("10.0.0.2", None, "10.0.0.2"),
        ("fd00::1", "2001:db8::7", "2001:db8::7"),
        ("testclient", "198.51.100.1", None),
        (None, "198.51.100.1", None),
    ],
    ids=[
        "direct",
        "untrusted-peer-forges-header",
        "one-trusted-proxy",
        "chain-read-from-the-right",
        "malformed-hop-stops-the-walk",
        "trusted-peer-without-header",
        "ipv6",
        "peer-not-an-address",
        "no-peer",
    ],
)
def test_client_ip_believes_forwarded_for_only_from_trusted_proxies(
    peer: str | None, forwarded: str | None, expected: str | None
) -> None:
    """The client IP is the peer's, or the first untrusted hop from the right when the peer
    is a trusted proxy; a forged header from anyone else changes nothing."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    assert expected == client_details(request(peer, headers))["ip"]


def test_user_agent_is_kept_printable_and_short() -> None:
    """Control characters are dropped and the user agent is cut at 256 characters."""
    details = client_details(request("203.0.113.5", {"User-Agent": "a\x01b" + "x" * 400}))
    assert "ab" + "x" * 254 == details["user_agent"]
