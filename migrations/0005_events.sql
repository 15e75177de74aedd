-- Schema v5: the payout events outbox, its commit-order feed, and the state of
-- webhook delivery (SPEC sections 2 and 3). Expand-only: new tables and
-- triggers; code that predates them keeps working and writes events too.
--
-- Outbox by construction: triggers on `payouts` write the events, in the
-- transaction of the change, so no code path (instant, periodic, cancel, a
-- DBA's fix) can forget one.
--
-- The feed follows commit order. A sequence alone does not: a transaction
-- that took seq 10 can commit after the one that took seq 11, and a reader
-- that has moved past 11 never sees 10. So every event carries a position,
-- an xid8, and readers only return events whose position is below their
-- snapshot's xmin, the oldest transaction id still running. Every transaction
-- that could still commit an event has an id >= xmin, and every event it
-- commits has a position >= its id: nothing can appear behind a reader's
-- cursor later. Readers order by (position, seq).
--
-- The position is the greater of the writing transaction's id and the xmax
-- of a snapshot taken when the event is written (ids below that xmax have all
-- been handed out). The transaction id alone can be older than an event that
-- committed before ours was written: an instant press takes its id when it
-- locks the park, a worker's `failed` for the park's previous payout can
-- commit meanwhile, and the new payout's `created` would otherwise sort
-- before that `failed`. With the snapshot's xmax, an event written after
-- another committed always sorts after it, whichever park. (This needs
-- READ COMMITTED, where each statement takes a fresh snapshot: the service
-- and procrastinate use nothing else.)

CREATE TABLE events (
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    xid        xid8 NOT NULL,
    type       text NOT NULL CHECK (type IN ('payout.created', 'payout.succeeded',
                                             'payout.failed', 'payout.skipped',
                                             'payout.cancelled')),
    park_id    text NOT NULL,
    -- No foreign key: payouts are never deleted (payouts_guard), and the check
    -- would lock the payout row once more in every paying transaction.
    payout_id  uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- The payout as of the change: the fields of the API's payout object, with
    -- money as JSON numbers (exact in jsonb) and timestamps with their offset.
    payout     jsonb NOT NULL CHECK (jsonb_typeof(payout) = 'object'),
    -- The global feed's order, and its index.
    PRIMARY KEY (xid, seq)
);

-- One park's feed (GET /v1/events with X-Park-Id) and webhook delivery per park.
CREATE INDEX events_park_feed ON events (park_id, xid, seq);

-- An event is a record of what happened: it is never edited. (Deleting old
-- events is left possible for a retention policy.)
CREATE FUNCTION events_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are records: UPDATE is refused (event %)', OLD.seq
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE TRIGGER events_immutable BEFORE UPDATE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_update();


CREATE FUNCTION events_position() RETURNS xid8 LANGUAGE sql VOLATILE AS $$
    SELECT greatest(pg_current_xact_id(), pg_snapshot_xmax(pg_current_snapshot()))
$$;

CREATE FUNCTION payout_event_snapshot(p payouts) RETURNS jsonb LANGUAGE sql STABLE AS $$
    SELECT jsonb_build_object(
        'id', p.id, 'park_id', p.park_id, 'kind', p.kind, 'status', p.status,
        'requested_amount', p.requested_amount, 'amount', p.amount, 'currency', p.currency,
        'billing_payout_id', p.billing_payout_id, 'failure_code', p.failure_code,
        'failure_message', p.failure_message, 'requested_by', p.requested_by,
        'created_at', p.created_at, 'updated_at', p.updated_at, 'completed_at', p.completed_at)
$$;

-- SECURITY DEFINER: the events are written with the schema owner's rights,
-- so the service's role needs no INSERT on `events` and cannot forge one.
--
-- Statement-level with a transition table: the periodic scan inserts a
-- thousand payouts in one statement, and this writes their events in one
-- INSERT instead of a thousand function calls.
CREATE FUNCTION payouts_events_created() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO events (xid, type, park_id, payout_id, payout)
    SELECT events_position(), 'payout.created', c.park_id, c.id, payout_event_snapshot(c)
    FROM created c;
    RETURN NULL;
END
$$;

CREATE TRIGGER payouts_events_created AFTER INSERT ON payouts
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION payouts_events_created();

-- Row-level with WHEN: the updates on the way (take, record the order, note
-- a transient error) are decided by the trigger's condition without calling
-- any function; only the one update that makes a payout final writes.
CREATE FUNCTION payouts_events_final() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO events (xid, type, park_id, payout_id, payout)
    VALUES (events_position(), 'payout.' || NEW.status, NEW.park_id, NEW.id,
            payout_event_snapshot(NEW));
    RETURN NULL;
END
$$;

-- `cancelled` is listed ahead of the migration that allows it.
CREATE TRIGGER payouts_events_final AFTER UPDATE OF status ON payouts
    FOR EACH ROW
    WHEN (OLD.status NOT IN ('succeeded', 'failed', 'skipped', 'cancelled')
          AND NEW.status IN ('succeeded', 'failed', 'skipped', 'cancelled'))
    EXECUTE FUNCTION payouts_events_final();


-- Webhook delivery (WEBHOOK_URL): the worker's dispatcher walks the feed
-- once, and per park delivers in order, a failing park waiting alone.

-- Where the dispatcher is in the feed: every event at or before this position
-- has been handed to its park's row below. No row: webhooks were never
-- switched on (the row is created by the first delivery round).
-- The lease makes one round run at a time; a round whose worker dies lets it
-- lapse, so nobody waits for a recovery (no procrastinate lock is involved).
CREATE TABLE webhook_state (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    xid          xid8 NOT NULL,
    seq          bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    lease_holder text,
    lease_until  timestamptz
);

-- Per park: delivered up to `delivered`, known up to `pending`; the events in
-- between are owed, oldest first. next_attempt_at is NULL when nothing is owed.
CREATE TABLE webhook_parks (
    park_id         text PRIMARY KEY,
    delivered_xid   xid8 NOT NULL,
    delivered_seq   bigint NOT NULL,
    pending_xid     xid8 NOT NULL,
    pending_seq     bigint NOT NULL,
    next_attempt_at timestamptz,
    failures        integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error      text,
    last_attempt_at timestamptz,
    CONSTRAINT webhook_parks_delivered_not_ahead CHECK (
        (delivered_xid, delivered_seq) <= (pending_xid, pending_seq)
    )
);

-- The parks a delivery round picks: those owed something, soonest due first.
CREATE INDEX webhook_parks_due ON webhook_parks (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;


-- Privileges for the roles of SPEC section 7, where they exist already: the
-- service reads events (written by the triggers above) and keeps the
-- delivery state; DBAs read everything.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_payouts_app') THEN
        GRANT SELECT ON events TO fleet_payouts_app;
        GRANT SELECT, INSERT, UPDATE ON webhook_state, webhook_parks TO fleet_payouts_app;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fleet_payouts_readonly') THEN
        GRANT SELECT ON events, webhook_state, webhook_parks TO fleet_payouts_readonly;
    END IF;
END
$$;
