"""ops/proxy/nginx.conf: what the shipped front proxy tells `serve` about each request."""

from __future__ import annotations

import ipaddress
import re

from starlette.requests import Request

from service.web.console import session as sessions
from tests.conftest import make_settings
from tests.helpers.emulator import REPO_ROOT

NGINX = REPO_ROOT / "ops" / "proxy" / "nginx.conf"


def proxied_headers(scheme: str, host: str) -> list[tuple[bytes, bytes]]:
    """The headers nginx sends upstream from `location /`, its variables filled in."""
    conf = re.sub(r"#[^\n]*", "", NGINX.read_text())
    location = conf[conf.index("location / {") :]
    location = location[: location.index("}")]
    values = {"$scheme": scheme, "$host": host, "$request_id": "r1"}
    values["$proxy_add_x_forwarded_for"] = "203.0.113.9"
    headers = []
    for name, value in re.findall(r"proxy_set_header\s+(\S+)\s+(\S+?);", location):
        for variable, filled in values.items():
            value = value.replace(variable, filled)
        if value.strip('"'):
            headers.append((name.lower().encode(), value.encode()))
    return headers


def test_console_cookies_are_secure_behind_the_shipped_nginx() -> None:
    """Behind ops/proxy/nginx.conf (TLS on 443, nginx among TRUSTED_PROXIES) `serve` knows
    the request came over HTTPS, so the console's cookies are Secure (nginx sent no
    X-Forwarded-Proto: the session cookie went out without Secure)."""
    assert "listen 443 ssl" in NGINX.read_text()
    scope = {
        "type": "http",
        "scheme": "http",
        "method": "GET",
        "path": "/console/sign-in",
        "headers": proxied_headers("https", "payouts.internal.example"),
        "client": ("10.0.0.5", 40000),
        "server": ("10.0.0.11", 8080),
        "query_string": b"",
    }
    settings = make_settings(
        "postgresql://unused", trusted_proxies=(ipaddress.ip_network("10.0.0.5/32"),)
    )
    assert sessions.is_https(Request(scope), settings)
