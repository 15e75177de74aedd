-- Schema v2: a payout orders one body under its own id and never another.
--
-- Expand only: every statement here leaves v1 code working, except the
-- paths that broke SPEC section 2 (clearing a recorded order to re-decide it
-- under the same key, failing an order whose outcome is unknown): the new
-- guard refuses those, and a v1 worker that tries them simply retries its
-- job until a v2 worker takes it over.

-- `cancelled`: a pending payout with no order, stopped by the park (issue 12).
-- Added NOT VALID then validated, so the table is not locked for a full scan
-- while the constraint is rebuilt.
ALTER TABLE payouts DROP CONSTRAINT payouts_status_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_status_check CHECK (
    status IN ('pending', 'processing', 'succeeded', 'failed', 'skipped', 'cancelled')
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_status_check;

ALTER TABLE payouts DROP CONSTRAINT payouts_final_has_completed_at;
ALTER TABLE payouts ADD CONSTRAINT payouts_final_has_completed_at CHECK (
    (status IN ('succeeded', 'failed', 'skipped', 'cancelled')) = (completed_at IS NOT NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_final_has_completed_at;

-- PAYOUT_MIN_AMOUNT in force when the payout was created (NULL on v1 rows):
-- an order smaller than it is never recorded, so never sent.
ALTER TABLE payouts ADD COLUMN min_amount numeric(18, 2) CHECK (min_amount > 0);
ALTER TABLE payouts ADD CONSTRAINT payouts_amount_above_minimum CHECK (
    amount IS NULL OR min_amount IS NULL OR amount >= min_amount
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_amount_above_minimum;

-- A periodic payout that Billing refused for good (stale balance, changed
-- currency) is followed at once by a new payout with its own id and fresh
-- figures: this names the one it follows. One follow-up per payout at most.
ALTER TABLE payouts ADD COLUMN follows uuid REFERENCES payouts (id);
CREATE UNIQUE INDEX payouts_one_follow_up ON payouts (follows) WHERE follows IS NOT NULL;

-- Cooldown: `cancelled` does not start one either (SPEC section 2).
CREATE INDEX payouts_instant_cooldown_v2 ON payouts (park_id, created_at DESC)
    WHERE kind = 'instant' AND status NOT IN ('failed', 'skipped', 'cancelled');

-- Orders whose outcome Billing has not told us yet: the alert on their age.
CREATE INDEX payouts_ordered_in_flight ON payouts (ordered_at)
    WHERE status = 'processing' AND ordered_at IS NOT NULL;


-- The state machine of SPEC section 2 (service/domain.py TRANSITIONS says the
-- same; tests/integration/test_state_machine.py tries every pair on both):
--
--     pending ──> processing ──> succeeded | failed | skipped
--        └──> cancelled
--
-- A non-final payout may be updated without changing status (its job id, the
-- last transient problem); a final one is frozen. Once an order is recorded
-- (ordered_at), its body is fixed for good and the payout ends only with
-- Billing's own answer: `succeeded`, or `failed` with Billing's refusal.
CREATE OR REPLACE FUNCTION payouts_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Every payout is born pending, with nothing ordered yet.
        -- (An unknown status is left to the CHECK constraint to name.)
        IF NEW.status IN ('processing', 'succeeded', 'failed', 'skipped', 'cancelled')
           OR NEW.ordered_at IS NOT NULL OR NEW.completed_at IS NOT NULL
           OR NEW.billing_payout_id IS NOT NULL THEN
            RAISE EXCEPTION 'a payout is created pending, with no order or outcome (payout %)', NEW.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'payouts are records: DELETE is refused (payout %)', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.id <> OLD.id OR NEW.park_id <> OLD.park_id OR NEW.kind <> OLD.kind
       OR NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key
       OR NEW.requested_amount IS DISTINCT FROM OLD.requested_amount
       OR NEW.requested_by IS DISTINCT FROM OLD.requested_by
       OR NEW.max_amount <> OLD.max_amount
       OR NEW.min_amount IS DISTINCT FROM OLD.min_amount
       OR NEW.follows IS DISTINCT FROM OLD.follows
       OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'payout % : identity columns are immutable', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status IN ('succeeded', 'failed', 'skipped', 'cancelled') THEN
        RAISE EXCEPTION 'payout % is final (%): it cannot change', OLD.id, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NOT (
        NEW.status = OLD.status
        OR (OLD.status = 'pending' AND NEW.status IN ('processing', 'cancelled'))
        OR (OLD.status = 'processing' AND NEW.status IN ('succeeded', 'failed', 'skipped'))
    ) THEN
        RAISE EXCEPTION 'payout %: % -> % is not a valid transition', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.ordered_at IS NOT NULL THEN
        -- The order may have reached Billing: the same key must never carry
        -- another body, and only Billing's answer ends the payout.
        IF NEW.ordered_at IS DISTINCT FROM OLD.ordered_at
           OR NEW.amount IS DISTINCT FROM OLD.amount
           OR NEW.currency IS DISTINCT FROM OLD.currency
           OR NEW.available IS DISTINCT FROM OLD.available
           OR NEW.billing_params IS DISTINCT FROM OLD.billing_params THEN
            RAISE EXCEPTION 'payout %: the order sent to Billing cannot change', OLD.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        IF NEW.status = 'skipped'
           OR (NEW.status = 'failed' AND NEW.failure_code = 'billing_unavailable') THEN
            RAISE EXCEPTION 'payout %: its order may have reached Billing; only Billing''s answer ends it', OLD.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    ELSIF NEW.status = 'succeeded' AND NEW.ordered_at IS NULL THEN
        RAISE EXCEPTION 'payout %: succeeded without an order', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.status = 'cancelled' AND NEW.ordered_at IS NOT NULL THEN
        RAISE EXCEPTION 'payout %: an ordered payout cannot be cancelled', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;


-- One periodic scan at a time, by a lease that expires with its holder: a
-- worker frozen mid-scan (SIGSTOP, a paused VM) keeps nobody else waiting
-- longer than the lease. Holding it is an optimisation (no second scan asks
-- Billing for the same balances); correctness rests on the due rule, the
-- park row locks and the in-flight index, so two scans can never pay twice.
CREATE TABLE scan_leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    expires_at timestamptz NOT NULL
);
