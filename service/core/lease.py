"""The one lease: at most one holder of a named chore across every host, by the database's clock.

A lease is a row of `scan_leases` (name, holder, expires_at). `take` holds it, or renews it
for its holder, until the database's now + ttl; it fails while another holder's lease has
not expired. `release` frees it at once. A holder frozen mid-chore (SIGSTOP, a paused VM)
keeps nobody waiting longer than its ttl, and finds out at its next `take` that it lost
the lease. Holding a lease is an optimisation (one scan asks Billing once); correctness
rests on row locks and constraints, never on the lease alone. SQL: sql/leases.sql.

Held under it: the periodic scan (`periodic_scan`, service/payouts/periodic.py) and the
returns reader (`returns`, service/payouts/returns.py).

The webhook feed's holder (`webhook_feed.lease_holder` / `lease_until`,
service/events/webhooks.py) is the same rule: one named holder, a deadline by the
database's clock, renewed each turn, released on stop. It stays on its own row for now
because workers of the release before take it there: moving it to `scan_leases` in one
release would let an old worker (looking at `webhook_feed`) and a new one (looking at
`scan_leases`) deliver at the same time during a rolling deploy. The way over is two
releases: one that takes both (this lease, then the row's), the next that takes only
this one and a migration dropping the row's columns.

The gate's probe (`billing_gate.probe_until`, service/billing/gate.py) is not a lease:
it has no holder to renew or release it; it is a state of the shared breaker (the one
slot handed out after the cool-off), which ends by the probe's outcome being recorded or
by its deadline passing, and it is taken in the same statement as the send budget's
slots under the gate row's lock. Moving it here would split that one statement in two.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from service.core import db

Q = db.queries("leases")


def new_holder() -> str:
    """A holder name unique to this attempt, saying which host and process holds it."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Lease:
    """One holder's claim on the lease `name`, `ttl` long from each take."""

    name: str
    ttl: timedelta
    holder: str = field(default_factory=new_holder)

    async def take(self, conn: db.Conn) -> bool:
        """Hold or renew the lease until the database's now + ttl; False if another holds it."""
        row = await db.fetch_one(conn, Q["take"], name=self.name, holder=self.holder, ttl=self.ttl)
        return row is not None

    async def release(self, conn: db.Conn) -> None:
        """Free the lease (if still ours) so that the next holder starts at once."""
        await db.execute(conn, Q["release"], name=self.name, holder=self.holder)
