"""Signed page cursors: only a cursor this API issued is accepted (SPEC section 3).

A cursor is `<payload>.<tag>`: the payload is the position (base64url JSON, as
`params.encode_cursor` writes it), the tag a truncated HMAC-SHA256 over the
list it pages and the payload. A made-up or edited cursor, or one from another
list, fails the tag and answers 400 before any value in it is read.

The key: CURSOR_SECRET when set (the same on every host), else derived from
the configured tokens, so a deploy needs no new secret. Derived keys change
when tokens rotate, and cursors issued before the rotation then answer 400
(the caller starts from the first page again); set CURSOR_SECRET to keep them.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from typing import Any, TypeVar

from service.core.settings import Settings
from service.web import params
from service.web.errors import ApiError

R = TypeVar("R")

# 128 bits: forging one is as hopeless as guessing a token, and a cursor stays short.
TAG_BYTES = 16
_DERIVATION = b"fleet-payouts/cursor-key/v1"


def key_for(settings: Settings) -> bytes:
    """The signing key of this deployment (see the module docstring)."""
    if settings.cursor_secret:
        material = settings.cursor_secret.reveal().encode()
    else:
        # Admin tokens are in the mix so that holding the API token alone is not enough.
        material = "\n".join(
            [
                "admin",
                *sorted(t.reveal() for t in settings.admin_tokens),
                "api",
                *sorted(t.reveal() for t in settings.api_tokens),
            ]
        ).encode()
    return hmac.new(_DERIVATION, material, hashlib.sha256).digest()


def sign(key: bytes, purpose: str, *parts: Any) -> str:
    """A cursor for `purpose` (the list it pages, e.g. "payouts") at the position `parts`."""
    payload = params.encode_cursor(*parts)
    return f"{payload}.{_tag(key, purpose, payload)}"


def verify(
    key: bytes, purpose: str, raw: str | None, kinds: tuple[Callable[[Any], Any], ...]
) -> tuple[Any, ...] | None:
    """The position in a cursor this API issued for `purpose` (None: absent or empty, the
    first page); anything else is a 400."""
    if not raw:
        return None
    payload, dot, tag = raw.rpartition(".")
    if (
        not dot
        or not tag
        or not tag.isascii()
        or not hmac.compare_digest(tag.encode(), _tag(key, purpose, payload).encode())
    ):
        raise ApiError("invalid_request", "cursor was not issued by this API")
    return params.decode_cursor(payload, kinds)


@dataclasses.dataclass(frozen=True)
class Pager:
    """The cursors of one list (`purpose`) under one key: where a page starts, and the
    cursor of the page after it."""

    key: bytes
    purpose: str

    def after(
        self, raw: str | None, kinds: tuple[Callable[[Any], Any], ...]
    ) -> tuple[Any, ...] | None:
        return verify(self.key, self.purpose, raw, kinds)

    def page(self, rows: list[R], limit: int, *keys: str) -> tuple[list[R], str | None]:
        """The first `limit` of `limit + 1` rows fetched, and the next page's cursor (the
        values of `keys` in the last row) if more exist."""
        rows, position = params.page(rows, limit, *keys)
        return rows, sign(self.key, self.purpose, *position) if position else None


def _tag(key: bytes, purpose: str, payload: str) -> str:
    try:
        message = f"{purpose}\n{payload}".encode()
    except UnicodeEncodeError:  # a lone surrogate from a query string: not ours
        return ""  # never equal to a (non-empty) tag
    digest = hmac.new(key, message, hashlib.sha256).digest()[:TAG_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")
