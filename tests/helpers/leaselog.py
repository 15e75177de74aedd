"""The drills' lease log: a table and triggers a drill adds to its own database (not a
migration; the service knows nothing of them) that record, with the database's clock and the
session's client port, every take, renewal and release of `scan_leases`, of `webhook_state`'s
lease and of `billing_gate`'s probe, and every act done under one (a periodic payout
inserted by the scan, not a follow-up; a webhook cursor or park mark written); and the check
of what they recorded.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# --- the lease log -------------------------------------------------------------------------

LEASE_LOG = """
CREATE TABLE drill_lease_log (
    n      bigserial PRIMARY KEY,
    lease  text NOT NULL,
    event  text NOT NULL CHECK (event IN ('take', 'renew', 'release', 'act')),
    holder text,
    until  timestamptz,
    at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    port   integer DEFAULT inet_client_port()
);

CREATE FUNCTION drill_log_scan_lease() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO drill_lease_log (lease, event, holder)
        VALUES (OLD.name, 'release', OLD.holder);
    ELSIF TG_OP = 'UPDATE' AND OLD.holder = NEW.holder THEN
        INSERT INTO drill_lease_log (lease, event, holder, until)
        VALUES (NEW.name, 'renew', NEW.holder, NEW.expires_at);
    ELSE
        INSERT INTO drill_lease_log (lease, event, holder, until)
        VALUES (NEW.name, 'take', NEW.holder, NEW.expires_at);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER drill_log AFTER INSERT OR UPDATE OR DELETE ON scan_leases
    FOR EACH ROW EXECUTE FUNCTION drill_log_scan_lease();

CREATE FUNCTION drill_log_webhook_state() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NEW.lease_until IS NOT NULL AND NEW.lease_until IS DISTINCT FROM OLD.lease_until THEN
        INSERT INTO drill_lease_log (lease, event, holder, until)
        VALUES ('webhook_round', 'take', NEW.lease_holder, NEW.lease_until);
    ELSIF NEW.lease_until IS NULL AND OLD.lease_until IS NOT NULL THEN
        INSERT INTO drill_lease_log (lease, event, holder)
        VALUES ('webhook_round', 'release', OLD.lease_holder);
    END IF;
    IF (NEW.xid, NEW.seq) IS DISTINCT FROM (OLD.xid, OLD.seq) THEN
        INSERT INTO drill_lease_log (lease, event) VALUES ('webhook_round', 'act');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER drill_log AFTER UPDATE ON webhook_state
    FOR EACH ROW EXECUTE FUNCTION drill_log_webhook_state();

CREATE FUNCTION drill_log_webhook_parks() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO drill_lease_log (lease, event) VALUES ('webhook_round', 'act');
    RETURN NULL;
END $$;
CREATE TRIGGER drill_log AFTER INSERT OR UPDATE ON webhook_parks
    FOR EACH ROW EXECUTE FUNCTION drill_log_webhook_parks();

CREATE FUNCTION drill_log_gate_probe() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF NEW.probe_until IS NOT NULL AND NEW.probe_until IS DISTINCT FROM OLD.probe_until THEN
        INSERT INTO drill_lease_log (lease, event, until)
        VALUES ('gate_probe', 'take', NEW.probe_until);
    ELSIF NEW.probe_until IS NULL AND OLD.probe_until IS NOT NULL THEN
        INSERT INTO drill_lease_log (lease, event) VALUES ('gate_probe', 'release');
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER drill_log AFTER UPDATE ON billing_gate
    FOR EACH ROW EXECUTE FUNCTION drill_log_gate_probe();

CREATE FUNCTION drill_log_periodic_payout() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    INSERT INTO drill_lease_log (lease, event) VALUES ('periodic_scan', 'act');
    RETURN NULL;
END $$;
CREATE TRIGGER drill_log AFTER INSERT ON payouts
    FOR EACH ROW WHEN (NEW.kind = 'periodic' AND NEW.follows IS NULL)
    EXECUTE FUNCTION drill_log_periodic_payout();
"""


@dataclass
class Tenure:
    """One holder's hold on a lease, from its take to its release or its last deadline."""

    lease: str
    host: str
    holder: str | None
    start: datetime
    until: datetime | None
    end: datetime | None = None

    def last(self) -> datetime | None:
        """When the hold ended: its release, else its deadline (None: no deadline known)."""
        if self.end is not None and self.until is not None:
            return min(self.end, self.until)
        return self.end or self.until


@dataclass
class Findings:
    """What the lease log says: takes and acts per lease, and what went wrong."""

    takes: dict[str, int]
    acts: dict[str, int]
    overlaps: list[str]  # a take while another hold had neither been released nor expired
    outside: list[str]  # an act by a host holding no hold of that lease at that moment
    unattributed: int  # entries whose client port no host's link had (alone) opened


# (client port, at) -> the host whose session that was, or None when it cannot be told.
HostOf = Callable[[int | None, datetime], str | None]


def lease_findings(log: list[dict[str, Any]], host_of: HostOf) -> Findings:
    """Replay the log (in its order, which the lease rows' locks make the order of the
    takes) into holds, and check each take and each act against them."""
    tenures: dict[str, list[Tenure]] = collections.defaultdict(list)
    found = Findings({}, {}, [], [], 0)
    acts: collections.Counter[str] = collections.Counter()
    for entry in log:
        lease, event, at = entry["lease"], entry["event"], entry["at"]
        host = host_of(entry["port"], at)
        if host is None:
            found.unattributed += 1
        held = tenures[lease]
        current = held[-1] if held and held[-1].end is None else None
        if event == "take":
            if current is not None and (current.until is None or current.until > at):
                found.overlaps.append(f"{lease}: {host} took it at {at} while {current}")
            if current is not None:
                current.end = at
            held.append(Tenure(lease, host or "?", entry["holder"], at, entry["until"]))
        elif event == "renew" and current is not None:
            current.until = entry["until"]
        elif event == "release" and current is not None:
            current.end = at
        elif event == "act":
            acts[lease] += 1
            within = [
                t for t in held if t.start <= at and ((last := t.last()) is None or at <= last)
            ]
            if host is None or any(t.host == "?" for t in within):
                continue  # whose act or whose hold cannot be told: counted, not judged
            if not any(t.host == host for t in within):
                found.outside.append(f"{lease}: {host} acted at {at}; holds then: {within}")
    found.takes = {lease: len(held) for lease, held in tenures.items()}
    found.acts = dict(acts)
    return found
