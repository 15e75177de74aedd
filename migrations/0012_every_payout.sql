-- Schema v12: every payout to a park (SPEC section 8): the paid instant option
-- (a fee and an end date), payouts the bank returns, and manual payouts that a
-- second admin approves.
--
-- Expand only. Old code never writes the new statuses, kinds or columns, and
-- every constraint replaced here is looser for the rows it writes (new
-- statuses and kinds are added, nothing it did is refused). The old cooldown
-- index stays for the old code's query; a later contract step drops it.

-- --- parks: the paid option ---------------------------------------------------

-- The fee terms of instant payouts: both or neither (no fee). A percent of the
-- amount, half-up to the cent, plus a fixed part (service/domain.py instant_fee).
ALTER TABLE parks ADD COLUMN instant_fee_percent numeric(5, 2)
    CHECK (instant_fee_percent >= 0 AND instant_fee_percent <= 100);
ALTER TABLE parks ADD COLUMN instant_fee_fixed numeric(18, 2) CHECK (instant_fee_fixed >= 0);
ALTER TABLE parks ADD CONSTRAINT parks_instant_fee_is_complete CHECK (
    (instant_fee_percent IS NULL) = (instant_fee_fixed IS NULL)
);
-- The end of the subscription: after it a press is refused (subscription_ended).
ALTER TABLE parks ADD COLUMN instant_payouts_until timestamptz;

-- --- payouts: new columns -----------------------------------------------------

-- The park's fee terms when the payout was created (identity: never change),
-- and the fee decided with the order (fixed with it, part of its one body).
ALTER TABLE payouts ADD COLUMN fee_percent numeric(5, 2) CHECK (fee_percent BETWEEN 0 AND 100);
ALTER TABLE payouts ADD COLUMN fee_fixed numeric(18, 2) CHECK (fee_fixed >= 0);
ALTER TABLE payouts ADD COLUMN fee_amount numeric(18, 2);
ALTER TABLE payouts ADD COLUMN net_amount numeric(18, 2);
-- What the bank said when it sent the money back, and when Billing recorded it.
ALTER TABLE payouts ADD COLUMN return_code text CHECK (length(return_code) BETWEEN 1 AND 100);
ALTER TABLE payouts ADD COLUMN returned_at timestamptz;
-- Manual payouts: why support asked, until when a second admin may approve,
-- and that admin's decision.
ALTER TABLE payouts ADD COLUMN approval_reason text CHECK (length(approval_reason) BETWEEN 1 AND 500);
ALTER TABLE payouts ADD COLUMN approval_expires_at timestamptz;
ALTER TABLE payouts ADD COLUMN approved_by text CHECK (length(approved_by) BETWEEN 1 AND 128);
ALTER TABLE payouts ADD COLUMN approved_at timestamptz;
ALTER TABLE payouts ADD COLUMN denied_by text CHECK (length(denied_by) BETWEEN 1 AND 128);
ALTER TABLE payouts ADD COLUMN denied_reason text CHECK (length(denied_reason) BETWEEN 1 AND 500);

-- --- payouts: constraints -----------------------------------------------------
-- Each replaced constraint is added NOT VALID and then validated, so the table
-- is not locked against writes for the scan.

ALTER TABLE payouts DROP CONSTRAINT payouts_kind_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_kind_check CHECK (
    kind IN ('instant', 'periodic', 'manual')
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_kind_check;

ALTER TABLE payouts DROP CONSTRAINT payouts_status_check;
ALTER TABLE payouts ADD CONSTRAINT payouts_status_check CHECK (
    status IN ('pending_approval', 'pending', 'processing', 'succeeded', 'failed', 'skipped',
               'cancelled', 'denied', 'expired', 'returned')
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_status_check;

ALTER TABLE payouts DROP CONSTRAINT payouts_final_has_completed_at;
ALTER TABLE payouts ADD CONSTRAINT payouts_final_has_completed_at CHECK (
    (status IN ('succeeded', 'failed', 'skipped', 'cancelled', 'denied', 'expired', 'returned'))
    = (completed_at IS NOT NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_final_has_completed_at;

-- A returned payout succeeded first: it keeps everything that says so.
ALTER TABLE payouts DROP CONSTRAINT payouts_succeeded_is_complete;
ALTER TABLE payouts ADD CONSTRAINT payouts_succeeded_is_complete CHECK (
    status NOT IN ('succeeded', 'returned')
    OR (amount IS NOT NULL AND currency IS NOT NULL AND billing_payout_id IS NOT NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_succeeded_is_complete;

-- A manual payout is requested by an admin with an Idempotency-Key, like a press.
ALTER TABLE payouts DROP CONSTRAINT payouts_instant_has_requester;
ALTER TABLE payouts ADD CONSTRAINT payouts_instant_has_requester CHECK (
    (kind IN ('instant', 'manual')) = (idempotency_key IS NOT NULL AND requested_by IS NOT NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_instant_has_requester;

-- A manual payout orders exactly its amount, whatever the balance said:
-- Billing refuses it (insufficient_funds) if the park has less.
ALTER TABLE payouts DROP CONSTRAINT payouts_amount_within_limits;
ALTER TABLE payouts ADD CONSTRAINT payouts_amount_within_limits CHECK (
    amount > 0
    AND amount <= max_amount
    AND (amount <= available OR kind = 'manual')
    AND (requested_amount IS NULL OR amount <= requested_amount)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_amount_within_limits;

ALTER TABLE payouts ADD CONSTRAINT payouts_manual_is_complete CHECK (
    kind <> 'manual' OR (
        requested_amount IS NOT NULL AND approval_reason IS NOT NULL
        AND approval_expires_at IS NOT NULL
        AND (amount IS NULL OR amount = requested_amount)
        AND fee_percent IS NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_manual_is_complete;

-- Only instant payouts carry fee terms; the fee exists only beside its amount,
-- and what reaches the park plus the fee is exactly what leaves its balance.
ALTER TABLE payouts ADD CONSTRAINT payouts_fee_adds_up CHECK (
    (fee_percent IS NULL) = (fee_fixed IS NULL)
    AND (fee_percent IS NULL OR kind = 'instant')
    AND (fee_amount IS NULL) = (net_amount IS NULL)
    AND (fee_amount IS NULL OR (
        fee_percent IS NOT NULL AND amount IS NOT NULL
        AND fee_amount >= 0 AND net_amount >= 0 AND net_amount = amount - fee_amount
        AND (min_amount IS NULL OR net_amount >= min_amount)))
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_fee_adds_up;

-- Returned: with Billing's code and time, and only then.
ALTER TABLE payouts ADD CONSTRAINT payouts_returned_is_complete CHECK (
    (status = 'returned') = (return_code IS NOT NULL AND returned_at IS NOT NULL)
    AND (return_code IS NULL) = (returned_at IS NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_returned_is_complete;

-- Four eyes: the approver is never the requester (compared case-blind, so
-- "Admin-1" is "admin-1"), and a decision names who made it.
ALTER TABLE payouts ADD CONSTRAINT payouts_four_eyes CHECK (
    (approved_by IS NULL OR lower(approved_by) <> lower(requested_by))
    AND (approved_by IS NULL) = (approved_at IS NULL)
    AND (approved_by IS NULL OR kind = 'manual')
    AND (denied_by IS NULL OR status = 'denied')
    AND (status <> 'denied' OR denied_by IS NOT NULL)
    AND (status <> 'pending_approval' OR approved_by IS NULL)
    AND (kind <> 'manual' OR status IN ('pending_approval', 'denied', 'expired')
         OR approved_by IS NOT NULL)
) NOT VALID;
ALTER TABLE payouts VALIDATE CONSTRAINT payouts_four_eyes;

-- --- payouts: indexes ---------------------------------------------------------

-- One manual payout awaiting approval per park (SPEC 8: 409 approval_pending).
CREATE UNIQUE INDEX payouts_one_awaiting_approval_per_park
    ON payouts (park_id) WHERE status = 'pending_approval';

-- A manual payout's Idempotency-Key is the admin's, not a park's: unique
-- across parks, so a key reused for another park is a reuse, not a new payout.
CREATE UNIQUE INDEX payouts_manual_idempotency_key
    ON payouts (idempotency_key) WHERE kind = 'manual';

-- Expiry: the requests whose approval time runs out first.
CREATE INDEX payouts_awaiting_approval ON payouts (approval_expires_at)
    WHERE status = 'pending_approval';

-- GET /v1/admin/payouts without a park: newest first.
CREATE INDEX payouts_created ON payouts (created_at DESC, id DESC);

-- Cooldown: a returned payout no longer counts (SPEC 8).
CREATE INDEX payouts_instant_cooldown_v3 ON payouts (park_id, created_at DESC)
    WHERE kind = 'instant' AND status NOT IN ('failed', 'skipped', 'cancelled', 'returned');



-- --- the state machine --------------------------------------------------------
--
--     pending_approval ──> pending | denied | expired     (manual only)
--     pending ──> processing ──> succeeded ──> returned
--        │            ├───────> failed | skipped
--        └──> cancelled
--
-- service/domain.py TRANSITIONS says the same; tests/integration/
-- test_state_machine.py tries every pair on both.
CREATE OR REPLACE FUNCTION payouts_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Born pending (or awaiting approval, manual only), with nothing
        -- ordered or decided yet. (An unknown status is the CHECK's to name.)
        IF NEW.status IN ('processing', 'succeeded', 'failed', 'skipped', 'cancelled',
                          'denied', 'expired', 'returned')
           OR (NEW.status = 'pending_approval') <> (NEW.kind = 'manual')
           OR NEW.ordered_at IS NOT NULL OR NEW.completed_at IS NOT NULL
           OR NEW.billing_payout_id IS NOT NULL OR NEW.fee_amount IS NOT NULL
           OR NEW.returned_at IS NOT NULL OR NEW.approved_by IS NOT NULL
           OR NEW.denied_by IS NOT NULL THEN
            RAISE EXCEPTION 'a payout is created pending (a manual one awaiting approval), with no order or outcome (payout %)', NEW.id
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
       OR NEW.fee_percent IS DISTINCT FROM OLD.fee_percent
       OR NEW.fee_fixed IS DISTINCT FROM OLD.fee_fixed
       OR NEW.approval_reason IS DISTINCT FROM OLD.approval_reason
       OR NEW.approval_expires_at IS DISTINCT FROM OLD.approval_expires_at
       OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'payout % : identity columns are immutable', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- A decision on a manual payout, once made, stands.
    IF (OLD.approved_by IS NOT NULL AND (NEW.approved_by IS DISTINCT FROM OLD.approved_by
                                         OR NEW.approved_at IS DISTINCT FROM OLD.approved_at))
       OR (OLD.denied_by IS NOT NULL AND (NEW.denied_by IS DISTINCT FROM OLD.denied_by
                                          OR NEW.denied_reason IS DISTINCT FROM OLD.denied_reason)) THEN
        RAISE EXCEPTION 'payout % : its approval decision is immutable', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- The only change a succeeded payout may still make: the bank sent it back.
    -- Everything else about it stays as Billing confirmed it.
    IF OLD.status = 'succeeded' AND NEW.status = 'returned' THEN
        IF NEW.ordered_at IS DISTINCT FROM OLD.ordered_at
           OR NEW.amount IS DISTINCT FROM OLD.amount
           OR NEW.currency IS DISTINCT FROM OLD.currency
           OR NEW.available IS DISTINCT FROM OLD.available
           OR NEW.billing_params IS DISTINCT FROM OLD.billing_params
           OR NEW.fee_amount IS DISTINCT FROM OLD.fee_amount
           OR NEW.net_amount IS DISTINCT FROM OLD.net_amount
           OR NEW.billing_payout_id IS DISTINCT FROM OLD.billing_payout_id
           OR NEW.failure_code IS DISTINCT FROM OLD.failure_code
           OR NEW.completed_at IS DISTINCT FROM OLD.completed_at THEN
            RAISE EXCEPTION 'payout %: a return changes nothing but the status and the return', OLD.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    IF OLD.status IN ('succeeded', 'failed', 'skipped', 'cancelled', 'denied', 'expired', 'returned') THEN
        RAISE EXCEPTION 'payout % is final (%): it cannot change', OLD.id, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NOT (
        NEW.status = OLD.status
        OR (OLD.status = 'pending_approval' AND NEW.status IN ('pending', 'denied', 'expired'))
        OR (OLD.status = 'pending' AND NEW.status IN ('processing', 'cancelled'))
        OR (OLD.status = 'processing' AND NEW.status IN ('succeeded', 'failed', 'skipped'))
    ) THEN
        RAISE EXCEPTION 'payout %: % -> % is not a valid transition', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- Approval time runs on the database's clock: approved before the
    -- deadline, expired only after it.
    IF OLD.status = 'pending_approval' AND NEW.status = 'pending'
       AND statement_timestamp() >= OLD.approval_expires_at THEN
        RAISE EXCEPTION 'payout %: its approval time ran out at %', OLD.id, OLD.approval_expires_at
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status = 'pending_approval' AND NEW.status = 'expired'
       AND statement_timestamp() < OLD.approval_expires_at THEN
        RAISE EXCEPTION 'payout %: it may still be approved until %', OLD.id, OLD.approval_expires_at
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.return_code IS NOT NULL OR NEW.returned_at IS NOT NULL THEN
        RAISE EXCEPTION 'payout %: only a succeeded payout can be returned', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.ordered_at IS NOT NULL THEN
        -- The order may have reached Billing: the same key must never carry
        -- another body, and only Billing's answer ends the payout.
        IF NEW.ordered_at IS DISTINCT FROM OLD.ordered_at
           OR NEW.amount IS DISTINCT FROM OLD.amount
           OR NEW.currency IS DISTINCT FROM OLD.currency
           OR NEW.available IS DISTINCT FROM OLD.available
           OR NEW.billing_params IS DISTINCT FROM OLD.billing_params
           OR NEW.fee_amount IS DISTINCT FROM OLD.fee_amount
           OR NEW.net_amount IS DISTINCT FROM OLD.net_amount THEN
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
    -- A payout with fee terms orders its fee with its amount, never without.
    IF NEW.ordered_at IS NOT NULL AND NEW.fee_percent IS NOT NULL AND NEW.fee_amount IS NULL THEN
        RAISE EXCEPTION 'payout %: its order must carry its fee', OLD.id
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


-- --- events -------------------------------------------------------------------
-- The outbox learns the new final statuses. Kept apart from the existing
-- trigger (a separate trigger and function), so it composes with changes to
-- that one: `payouts_events_final` ignores these three (its WHEN does not list
-- denied or expired, and a returned payout was already succeeded).

ALTER TABLE events DROP CONSTRAINT IF EXISTS events_type_check;
ALTER TABLE events ADD CONSTRAINT events_type_check CHECK (
    type IN ('payout.created', 'payout.succeeded', 'payout.failed', 'payout.skipped',
             'payout.cancelled', 'payout.denied', 'payout.expired', 'payout.returned')
) NOT VALID;
ALTER TABLE events VALIDATE CONSTRAINT events_type_check;

-- The event's payout carries the new fields of the payout object.
CREATE OR REPLACE FUNCTION payout_event_snapshot(p payouts) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', p.id, 'park_id', p.park_id, 'kind', p.kind, 'status', p.status,
        'requested_amount', p.requested_amount, 'amount', p.amount, 'currency', p.currency,
        'billing_payout_id', p.billing_payout_id, 'failure_code', p.failure_code,
        'failure_message', p.failure_message, 'requested_by', p.requested_by,
        'created_at', p.created_at, 'updated_at', p.updated_at, 'completed_at', p.completed_at,
        'fee_amount', p.fee_amount, 'net_amount', p.net_amount,
        'return_code', p.return_code, 'returned_at', p.returned_at,
        'approval_reason', p.approval_reason, 'approved_by', p.approved_by,
        'approved_at', p.approved_at, 'denied_by', p.denied_by,
        'denied_reason', p.denied_reason)
$$;

CREATE FUNCTION payouts_events_decided() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO events (xid, type, park_id, payout_id, payout)
    VALUES (events_position(), 'payout.' || NEW.status, NEW.park_id, NEW.id,
            payout_event_snapshot(NEW));
    RETURN NULL;
END
$$;

CREATE TRIGGER payouts_events_decided AFTER UPDATE OF status ON payouts
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('denied', 'expired', 'returned'))
    EXECUTE FUNCTION payouts_events_decided();


-- --- returns: where the reader is in Billing's feed ---------------------------

-- One row: the cursor of GET /v1/returns after the last page applied. The
-- reader runs under the `returns` lease of scan_leases (one at a time).
CREATE TABLE billing_returns_cursor (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor     text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO billing_returns_cursor DEFAULT VALUES;

-- Returns Billing reported that no succeeded payout of ours explains (an
-- unknown key, or a payout that is not succeeded here): never applied,
-- reported by reconciliation as `returned_at_billing`.
CREATE TABLE billing_returns_unmatched (
    idempotency_key text PRIMARY KEY,
    code            text NOT NULL,
    returned_at     timestamptz NOT NULL,
    our_status      text,
    seen_at         timestamptz NOT NULL DEFAULT now()
);


-- Privileges: service/roles.py's policy gives the app role DML on every new
-- table and the readonly role SELECT; migrate applies it after this file.
