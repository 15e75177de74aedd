-- Billing protected by construction (SPEC section 4): the global budget's
-- slot ledger, Billing's Retry-After and the circuit breaker, shared by every
-- host through the one coordinator they all have, this database; and the
-- record of the daily reconciliation with Billing.
--
-- Expand-only: new tables and a new index. Code that predates them ignores
-- them, so the previous version keeps running during a rolling deploy.

-- One row, the gate every call to Billing passes. Hot it is not: a host claims
-- the slots of the next few tens of milliseconds in one update, and writes
-- failures only when Billing fails.
CREATE TABLE billing_gate (
    singleton            boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The slot ledger (a generic cell rate algorithm): the earliest time, on
    -- this database's clock, at which the next call may leave. A claim takes
    -- consecutive slots one spacing apart from here and moves it past them,
    -- so two hosts can never hold slots closer than one spacing.
    next_slot_at         timestamptz NOT NULL DEFAULT now(),
    -- No call leaves before this: Billing's Retry-After, or the breaker's cool-off.
    paused_until         timestamptz NOT NULL DEFAULT now(),
    pause_reason         text CHECK (pause_reason IN ('throttled', 'breaker')),
    -- Transient failures (5xx, timeouts, no connection) in a row, all hosts
    -- together; any answer from Billing resets it.
    consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    -- Open: calls wait out the cool-off, then a single probe call decides.
    breaker_open         boolean NOT NULL DEFAULT false,
    -- The probe's lease while the breaker is open: until then nobody else
    -- calls; a probe whose host died frees the way when its lease runs out.
    probe_until          timestamptz,
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT billing_gate_probe_only_when_open CHECK (probe_until IS NULL OR breaker_open)
);

INSERT INTO billing_gate DEFAULT VALUES;

-- One row per daily reconciliation run by the workers: every worker reports
-- the latest run's count as fleet_payouts_reconciliation_mismatches, so the
-- gauge does not depend on which worker happened to run it.
CREATE TABLE billing_reconciliations (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    since       timestamptz NOT NULL,
    until       timestamptz NOT NULL,
    mismatches  integer NOT NULL CHECK (mismatches >= 0),
    by_kind     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(by_kind) = 'object'),
    finished_at timestamptz NOT NULL DEFAULT now(),
    CHECK (since < until)
);

-- Reconciliation walks our succeeded payouts by completion time, one window a day.
CREATE INDEX payouts_succeeded_completed ON payouts (completed_at) WHERE status = 'succeeded';

-- The roles of SPEC section 7 may or may not exist yet (migrate creates them
-- when it may): grant what the app needs on the new tables when they do.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_payouts_app') THEN
        GRANT SELECT, UPDATE ON billing_gate TO fleet_payouts_app;
        GRANT SELECT, INSERT ON billing_reconciliations TO fleet_payouts_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_payouts_readonly') THEN
        GRANT SELECT ON billing_gate, billing_reconciliations TO fleet_payouts_readonly;
    END IF;
END
$$;
