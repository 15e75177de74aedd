-- Schema v8: feed positions assigned after commit (SPEC section 2 "Events";
-- issue 15, breaks 3 and 4).
--
-- v5 ordered the feed by transaction ids and showed only events below the
-- snapshot's xmin: one idle transaction anywhere in the cluster froze the
-- feed, and a dump restored into a fresh cluster (ids restart) sorted new
-- events before old ones for good. Now every event gets a plain bigint
-- `position` once it has committed, from one sequencer at a time:
--
-- * events_sequence() stamps the committed events that have none, lowest
--   seq first, with the numbers after events_sequencer.last_position, under
--   that row's lock. Each run sees what committed before it started; what
--   commits later is stamped by a later run with larger numbers. So an event
--   committed before E has a position below E's, or shares E's run (both
--   committed before that run, both made readable by its one commit).
-- * Within a run, seq order: one park's events are written under its row
--   lock (or behind its in-flight payout), so a park's seq order is its
--   commit order.
-- * Readers return stamped events only, in position order, and stamp first
--   (GET /v1/events and every webhook turn call it): readable as soon as
--   committed, whatever else is open in the cluster.
-- * Positions are table data: pg_dump, a restore into a fresh cluster and a
--   logical copy keep them, and cursors with them.
--
-- Expand only (rolling deploy): the v5 triggers and `xid` stay, so code that
-- predates this keeps reading its (xid, seq) feed and delivering from
-- webhook_state/webhook_parks; a later migration drops them.

-- No default and NOT VALID: both are catalog changes only, whatever the history.
ALTER TABLE events ADD COLUMN position bigint;
ALTER TABLE events ADD CONSTRAINT events_position_positive CHECK (position > 0) NOT VALID;

-- The sequencer's state: the last position handed out. A row, not a sequence:
-- it serialises the sequencer (its row lock) and never goes back, even when
-- retention has deleted every event.
CREATE TABLE events_sequencer (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_position bigint NOT NULL CHECK (last_position >= 0),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- An event is a record: the one change allowed is the sequencer's stamp, once.
CREATE OR REPLACE FUNCTION events_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.position IS NULL AND NEW.position IS NOT NULL
       AND to_jsonb(NEW) - 'position' = to_jsonb(OLD) - 'position' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'events are records: UPDATE is refused (event %)', OLD.seq
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;

-- The events already written are stamped by the sequencer too, lowest seq
-- first, as readers and webhook turns call it after the deploy: rewriting
-- them here would hold this migration's lock on `events` (and so every
-- payout's change) for minutes per million events (measured: 211 s for 1 M).
INSERT INTO events_sequencer (last_position) VALUES (0);

-- The feed, every park's and one park's (empty at first: built at once).
CREATE UNIQUE INDEX events_feed ON events (position) WHERE position IS NOT NULL;
CREATE INDEX events_park_position ON events (park_id, position) WHERE position IS NOT NULL;
-- What the sequencer has still to stamp, with the primary key's columns.
CREATE INDEX events_unstamped ON events (seq, xid) WHERE position IS NULL;

-- Stamps up to `max_events` committed events, returns how many. SECURITY
-- DEFINER: the app role calls it and cannot write `events` itself.
-- VOLATILE plpgsql in READ COMMITTED: each statement below takes a fresh
-- snapshot, so the UPDATE sees every stamp of the run that held the lock
-- before us.
CREATE FUNCTION events_sequence(max_events integer DEFAULT 10000) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    last bigint;
    stamped bigint;
BEGIN
    -- Nothing to do is the usual case: no lock, no transaction id.
    IF NOT EXISTS (SELECT 1 FROM events WHERE position IS NULL) THEN
        RETURN 0;
    END IF;
    SELECT s.last_position INTO last FROM events_sequencer s WHERE s.id FOR UPDATE;
    WITH batch AS (
        SELECT e.xid, e.seq, last + row_number() OVER (ORDER BY e.seq) AS position
        FROM (SELECT xid, seq FROM events WHERE position IS NULL
              ORDER BY seq LIMIT max_events) e
    )
    UPDATE events e SET position = b.position FROM batch b
    WHERE e.xid = b.xid AND e.seq = b.seq;
    GET DIAGNOSTICS stamped = ROW_COUNT;
    IF stamped > 0 THEN
        UPDATE events_sequencer SET last_position = last + stamped, updated_at = now() WHERE id;
    END IF;
    RETURN stamped;
END
$$;


-- Retention (EVENTS_RETENTION_DAYS): deletes up to `max_events` of the oldest
-- stamped events committed more than `days` days ago, and returns how many.
-- Only a prefix of the feed, so "the oldest kept" is one position and a
-- cursor before it is known to have missed events (410 cursor_expired). The
-- caller repeats it, each call its own short transaction: no long lock.
-- SECURITY DEFINER: the app role may delete no event itself, and through
-- this function none younger than a week (a leaked app password cannot wipe
-- the recent feed, whatever it passes).
CREATE FUNCTION events_expire(days double precision, max_events integer DEFAULT 5000)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    deleted bigint;
BEGIN
    IF days IS NULL OR days < 7 THEN
        RAISE EXCEPTION 'events are kept at least 7 days (asked: %)', days
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH head AS (
        SELECT xid, seq, position, created_at FROM events
        WHERE position IS NOT NULL ORDER BY position LIMIT max_events
    ), prefix AS (
        SELECT xid, seq FROM head
        WHERE position < coalesce(
            (SELECT min(position) FROM head
             WHERE created_at >= now() - make_interval(secs => days * 86400)),
            9223372036854775807)
    )
    DELETE FROM events e USING prefix p WHERE e.xid = p.xid AND e.seq = p.seq;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;


-- Webhook delivery by position (service/webhooks.py). New tables, so that v5
-- dispatchers still running during the deploy keep their own state: both
-- deliver meanwhile (at least once; consumers dedupe by id).

-- Where the dispatcher is in the feed: every event at or before `position`
-- has been handed to its park. Created at the feed's end when webhooks are
-- first switched on (history is read through the feed, not pushed).
-- `owed` counts events handed to parks and not delivered yet, so the
-- undelivered gauge reads two rows, not the history.
CREATE TABLE webhook_feed (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    position     bigint NOT NULL CHECK (position >= 0),
    owed         bigint NOT NULL DEFAULT 0 CHECK (owed >= 0),
    started_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    lease_holder text,
    lease_until  timestamptz
);

-- Per park: delivered up to `delivered`, known up to `pending`; `owed` events in
-- between, the oldest committed at `oldest_owed_at`. next_attempt_at is NULL
-- when nothing is owed.
CREATE TABLE webhook_feed_parks (
    park_id         text PRIMARY KEY,
    delivered       bigint NOT NULL,
    pending         bigint NOT NULL,
    owed            integer NOT NULL DEFAULT 0 CHECK (owed >= 0),
    oldest_owed_at  timestamptz,
    next_attempt_at timestamptz,
    failures        integer NOT NULL DEFAULT 0 CHECK (failures >= 0),
    last_error      text,
    last_attempt_at timestamptz,
    CONSTRAINT webhook_feed_parks_delivered_not_ahead CHECK (delivered <= pending)
);

CREATE INDEX webhook_feed_parks_due ON webhook_feed_parks (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX webhook_feed_parks_oldest ON webhook_feed_parks (oldest_owed_at)
    WHERE oldest_owed_at IS NOT NULL;

-- Webhooks already on (webhook_state has its row): the new dispatcher starts
-- at the first event v5 had not delivered everywhere, once the events of v5
-- are stamped (sql/webhooks.sql `start`).
