"""Who and from where: the client facts an audit entry keeps about a request.

X-Forwarded-For is anyone's to write: it is believed only when the peer is
one of TRUSTED_PROXIES, and then read from the right, skipping our own
proxies, so the first address a trusted proxy saw is the client's. Every
X-Forwarded-For line counts, in order, as one list (RFC 9110 section 5.3): a
proxy that appends its own line (HAProxy's `option forwardfor`) puts the
address it saw last, so reading only the first line would believe the client.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from starlette.requests import Request

from service.web.state import settings_of

# Enough to tell browsers and integrations apart; an audit row is not a log dump.
MAX_USER_AGENT = 256
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_details(request: Request) -> dict[str, Any]:
    """{"ip": ..., "user_agent": ...}: what every user and admin audit entry stores as "client"."""
    return {"ip": client_ip(request), "user_agent": _user_agent(request)}


def client_ip(request: Request) -> str | None:
    peer = _peer_address(request.client.host if request.client else None)
    if peer is None:
        return None
    trusted = settings_of(request).trusted_proxies
    if not _is_trusted(peer, trusted):
        return str(peer)
    combined = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [h.strip() for h in combined.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # a malformed hop: nothing left of it can be trusted
        if not _is_trusted(address, trusted):
            return str(address)
        peer = address
    return str(peer)


# Parsing the peer's address and testing addresses against each trusted network are
# done on every press for the same few peers and proxies: both are cached (entries of a
# few hundred bytes). Hops of X-Forwarded-For are parsed uncached: their text is the
# caller's, of any length.
@functools.lru_cache(maxsize=4096)
def _is_trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address in net for net in trusted)


@functools.lru_cache(maxsize=4096)
def _peer_address(raw: str | None) -> Address | None:
    """The socket peer's address (text from the OS, not the caller)."""
    return _address(raw)


def _address(raw: str | None) -> Address | None:
    try:
        return ipaddress.ip_address(raw) if raw else None
    except ValueError:
        return None


def _user_agent(request: Request) -> str | None:
    raw = request.headers.get("user-agent")
    if raw is None:
        return None
    # Headers arrive as latin-1 text; keep the printable part (no control bytes).
    return "".join(c for c in raw if c.isprintable())[:MAX_USER_AGENT] or None
