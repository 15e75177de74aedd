"""service/web/cursors.py: only a cursor this API signed, for the same list, is read back."""

from __future__ import annotations

from typing import Any

import pytest

from service.web import cursors
from service.web.errors import ApiError
from tests.conftest import make_settings

KINDS = (int, str)


def key(**overrides: Any) -> bytes:
    return cursors.key_for(make_settings("postgresql://unused/db", **overrides))


def test_a_signed_cursor_reads_back_its_position() -> None:
    """sign then verify with the same key and list gives the position back; empty is none."""
    k = key()
    assert (7, "x") == cursors.verify(k, "audit", cursors.sign(k, "audit", 7, "x"), KINDS)
    assert None is cursors.verify(k, "audit", "", KINDS)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.split(".")[0],  # the payload alone, as cursors were before signing
        lambda c: "A" + c[1:],  # an edited position
        lambda c: c[:-1] + ("A" if c[-1] != "A" else "B"),  # an edited tag
        lambda c: c + "\ud800",  # a lone surrogate from a query string
    ],
    ids=["unsigned", "edited-payload", "edited-tag", "surrogate"],
)
def test_a_cursor_not_issued_as_it_is_is_a_400(mutate: object) -> None:
    """Any change to an issued cursor makes it one this API did not issue: 400."""
    k = key()
    raw = mutate(cursors.sign(k, "audit", 7, "x"))  # type: ignore[operator]
    with pytest.raises(ApiError) as info:
        cursors.verify(k, "audit", raw, KINDS)
    assert "invalid_request" == info.value.code


def test_a_cursor_belongs_to_its_list_and_its_key() -> None:
    """A cursor from another list, or signed with another deployment's key, is a 400; with
    CURSOR_SECRET set the key no longer depends on the tokens (rotation keeps cursors)."""
    k = key()
    raw = cursors.sign(k, "payouts/p1", 7, "x")
    for other_key, purpose in (
        (k, "payouts/p2"),
        (key(admin_tokens=("other-admin-token-0",)), "payouts/p1"),
    ):
        with pytest.raises(ApiError):
            cursors.verify(other_key, purpose, raw, KINDS)
    secret = "cursor-secret-0123456789"
    assert key(cursor_secret=secret) == key(
        cursor_secret=secret, api_tokens=("rotated-api-token-0",)
    )
