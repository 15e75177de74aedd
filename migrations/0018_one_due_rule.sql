-- One due rule (issue 16): SPEC section 2's "a park is due for a periodic payout" written
-- once, as SQL functions the planner inlines (LANGUAGE sql, one expression, no SET
-- clause), so a query that calls them is planned exactly as if it spelled the rule out:
-- the due scan still walks parks_periodic_anchor (built on the same greatest(...)) in
-- order, and under FOR UPDATE the rule stays a condition on the locked row, re-checked
-- on its newest version. Expand only: the previous code's queries do not use them.
-- service/payouts/model.py's Python rule is checked against these by
-- tests/integration/test_due_rule.py.

-- When the park's period starts counting: the latest of its registration, its last
-- succeeded payout (not returned) and its last periodic attempt. parks_periodic_anchor
-- (0001) indexes this very expression.
CREATE FUNCTION park_periodic_anchor(
    registered_at timestamptz,
    last_payout_at timestamptz,
    last_periodic_attempt_at timestamptz
) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN greatest(registered_at, last_payout_at, last_periodic_attempt_at);

-- Whether the park's own row makes it due at `at` after `period`: periodic payouts on,
-- not on hold, and its anchor at least `period` old. (Nothing in flight is the other
-- half of the rule: a probe of payouts, which an inlinable function cannot hold.)
-- The period is counted in UTC, as the service's sessions (service/core/db.py) and the
-- API's Python rule count it: a session in a zone with DST (psql, a report) gets the
-- same answer, not one an hour off around the change.
CREATE FUNCTION park_periodic_due(
    enabled boolean,
    hold_reason text,
    registered_at timestamptz,
    last_payout_at timestamptz,
    last_periodic_attempt_at timestamptz,
    period interval,
    at timestamptz
) RETURNS boolean
-- IMMUTABLE: counted in UTC, the answer depends on the arguments alone (and the planner
-- inlines no function declared stricter than its body).
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN enabled AND hold_reason IS NULL
       AND park_periodic_anchor(registered_at, last_payout_at, last_periodic_attempt_at)
           <= ((at AT TIME ZONE 'UTC') - period) AT TIME ZONE 'UTC';
