"""An admin's change to a park: register it, switch its payouts, set its params, put
it on hold or release it. The use case behind `PUT /v1/parks/{park_id}` and the
console's park forms, so both edges apply one rule set and audit alike.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Any

from service.audit import store as audit
from service.core import db
from service.parks import store as parks
from service.parks.fees import Fee

MAX_HOLD_REASON = 500
# Control characters (C0, DEL, C1) are refused and one visible character is required; a
# regular expression rather than str.isprintable, so that the OpenAPI description can
# state the same rule (service/web/params.py takes it from here).
HOLD_REASON_PATTERN = (
    r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"
)
HOLD_REASON_RE = re.compile(HOLD_REASON_PATTERN)


class InvalidChange(ValueError):
    """The change breaks a rule (a hold reason empty, too long or unprintable)."""


class ParkNotFound(Exception):
    """The change is for an existing park only, and there is none."""


def hold_reason(raw: object) -> str:
    """A hold's reason as stored: stripped, 1-MAX_HOLD_REASON characters, not blank, no
    control characters (the API's rule, service/web/params.py HOLD_REASON_PATTERN)."""
    if (
        not isinstance(raw, str)
        or not 0 < len(raw.strip()) <= MAX_HOLD_REASON
        or not HOLD_REASON_RE.fullmatch(raw)
    ):
        raise InvalidChange(
            f"a hold's reason is 1-{MAX_HOLD_REASON} characters, not blank, no control characters"
        )
    return raw.strip()


@dataclasses.dataclass(frozen=True)
class ParkChange:
    park_id: str
    user_id: str
    request_id: str
    # What the audit entry records as "changes" (the request as the edge read it).
    changes: dict[str, Any]
    instant: bool | None = None
    periodic: bool | None = None
    params: dict[str, Any] | None = None
    # None leaves the hold as it is; Hold(reason=None) releases it.
    hold: parks.Hold | None = None
    # The paid option (SPEC section 8): None clears it, UNCHANGED leaves it.
    fee: Fee | parks.Unchanged | None = parks.UNCHANGED
    until: datetime | parks.Unchanged | None = parks.UNCHANGED
    client: dict[str, Any] | None = None
    # The console changes parks that exist; the API also registers new ones.
    existing_only: bool = False
    via: str | None = None


async def apply(conn: db.Conn, change: ParkChange) -> tuple[parks.Park, bool]:
    """The park as changed and whether it was created, with its audit entry, in one
    transaction; ParkNotFound for an `existing_only` change of an unknown park."""
    async with conn.transaction():
        # Under the park's row lock, like every decision about its payouts: a hold
        # that commits first always wins against a press that waited for it.
        if change.existing_only and await parks.lock(conn, change.park_id) is None:
            raise ParkNotFound(change.park_id)
        row, created = await parks.upsert(
            conn,
            change.park_id,
            instant=change.instant,
            periodic=change.periodic,
            params=change.params,
            hold=change.hold,
            fee=change.fee,
            until=change.until,
        )
        details: dict[str, Any] = {"changes": change.changes, "client": change.client}
        if change.via is not None:
            details["via"] = change.via
        await audit.write(
            conn,
            audit.Entry(
                actor_type="admin",
                actor_id=change.user_id,
                park_id=change.park_id,
                action="park.register" if created else "park.update",
                outcome="ok",
                request_id=change.request_id,
                details=details,
            ),
        )
    return row, created
