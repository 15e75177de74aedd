-- The scheduled checks' last results (issue 18): `fleet-payouts audit verify` (a timer, a
-- compose job, or a DBA) and the workers' daily reconciliation with Billing each keep one
-- row here; every worker exports it (fleet_payouts_audit_verify_*,
-- fleet_payouts_check_expected_since_timestamp_seconds) and the alerts read those, so a
-- failed or missing run reaches a person whoever started it and wherever.
-- `expected_since` is when the check started to be owed: with no run since, "never ran"
-- alerts once it is older than the check's period allows (a fresh install is not late).
-- Expand only: older code neither reads nor writes it.
CREATE TABLE ops_checks (
    check_name     text PRIMARY KEY CHECK (check_name IN ('audit_verify', 'reconcile')),
    expected_since timestamptz NOT NULL DEFAULT now(),
    last_run_at    timestamptz,           -- the last run that reached a verdict
    last_ok        boolean,               -- its verdict: intact / no mismatch
    last_ok_at     timestamptz,           -- the last run whose verdict was ok
    last_detail    text CHECK (length(last_detail) <= 2000),  -- the first broken entry, ...
    CHECK ((last_run_at IS NULL) = (last_ok IS NULL))
);
INSERT INTO ops_checks (check_name) VALUES ('audit_verify'), ('reconcile');

-- A daily reconciliation that ran before this table existed counts as its last run.
UPDATE ops_checks c
SET last_run_at = r.finished_at, last_ok = r.mismatches = 0,
    last_ok_at = CASE WHEN r.mismatches = 0 THEN r.finished_at END
FROM (SELECT finished_at, mismatches FROM billing_reconciliations ORDER BY id DESC LIMIT 1) r
WHERE c.check_name = 'reconcile';
