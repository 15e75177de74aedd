-- start --
-- Webhooks are on: the dispatcher's place is the feed's end (after stamping),
-- the first time only. History is read through GET /v1/events, not pushed.
-- Webhooks of the version before (a webhook_state row): just before the first
-- event it had not delivered everywhere (what it had comes again: at least
-- once); every event it knew is stamped by then (Dispatcher.start).
INSERT INTO webhook_feed (position)
SELECT CASE WHEN v5.xid IS NULL THEN q.last_position ELSE least(
           (SELECT min(e.position) FROM events e WHERE (e.xid, e.seq) > (v5.xid, v5.seq)),
           (SELECT min(e.position)
            FROM webhook_parks w
            JOIN events e ON e.park_id = w.park_id
                         AND (e.xid, e.seq) > (w.delivered_xid, w.delivered_seq)
            WHERE w.next_attempt_at IS NOT NULL),
           q.last_position + 1
       ) - 1 END
FROM events_sequencer q
LEFT JOIN webhook_state v5 ON v5.id
ON CONFLICT (id) DO NOTHING

-- acquire --
-- One process delivers at a time: the holder renews its lease for `seconds`
-- every turn; another takes it once it is free or has lapsed.
UPDATE webhook_feed
SET lease_holder = %(holder)s, lease_until = now() + make_interval(secs => %(seconds)s)
WHERE id AND (lease_holder = %(holder)s OR lease_until IS NULL OR lease_until < now())
RETURNING lease_holder

-- release --
-- The holder stops (its process ends): another may take over at once.
UPDATE webhook_feed SET lease_until = NULL WHERE id AND lease_holder = %(holder)s

-- hand_out --
-- The next stamped events of the feed are handed to their parks: a park's
-- newest becomes its pending mark and its owed count grows, a park met for the
-- first time is owed nothing from before the dispatcher's place, and the
-- place moves past the batch. The state row's lock serialises dispatchers.
WITH state AS (
    SELECT position FROM webhook_feed WHERE id FOR UPDATE
), batch AS (
    SELECT e.position, e.park_id, e.created_at
    FROM state s
    CROSS JOIN LATERAL (
        SELECT position, park_id, created_at FROM events e
        WHERE e.position > s.position
        ORDER BY e.position
        LIMIT %(limit)s
    ) e
), per_park AS (
    SELECT park_id, max(position) AS newest, count(*) AS n, min(created_at) AS oldest
    FROM batch
    GROUP BY park_id
), handed AS (
    INSERT INTO webhook_feed_parks AS w
        (park_id, delivered, pending, owed, oldest_owed_at, next_attempt_at)
    SELECT p.park_id, s.position, p.newest, p.n, p.oldest, now()
    FROM per_park p, state s
    ON CONFLICT (park_id) DO UPDATE
    SET pending = excluded.pending,
        owed = w.owed + excluded.owed,
        oldest_owed_at = coalesce(w.oldest_owed_at, excluded.oldest_owed_at),
        -- A park waiting out a backoff keeps waiting; an idle one is due now.
        next_attempt_at = coalesce(w.next_attempt_at, excluded.next_attempt_at)
    WHERE excluded.pending > w.pending
), last AS (
    SELECT max(position) AS position, count(*) AS n FROM batch
)
UPDATE webhook_feed f
SET position = last.position, owed = f.owed + last.n, updated_at = now()
FROM last
WHERE last.n > 0
RETURNING last.n AS handed

-- due --
-- Parks of one lane (failing or not) whose delivery is due and not already
-- under way in this dispatcher, soonest first, each with the events it is owed, oldest first (at most
-- per_park). A park owed events that are gone (retention) comes back once,
-- with no event, to be cleared.
SELECT e.seq, e.position, e.type, e.created_at, e.payout::text AS payout,
       w.park_id, w.failures, w.pending
FROM (
    SELECT * FROM webhook_feed_parks
    WHERE next_attempt_at <= now() AND (failures > 0) = %(failing)s
      AND NOT park_id = ANY(%(busy)s::text[])
    ORDER BY next_attempt_at
    LIMIT %(parks)s
) w
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE e.park_id = w.park_id AND e.position > w.delivered AND e.position <= w.pending
    ORDER BY e.position
    LIMIT %(per_park)s
) e ON true
ORDER BY w.next_attempt_at, w.park_id, e.position

-- record --
-- Parks' outcomes: delivered up to `position` when anything went through (NULL:
-- nothing did), how many events that was, and the error that stopped it with
-- the delay before the next attempt (NULL: no error). Positions never move
-- back; the owed counts (per park and in total) shrink by what was delivered.
WITH r AS (
    SELECT park_id, position, sent, error, delay
    FROM unnest(%(park_ids)s::text[], %(positions)s::bigint[], %(sent)s::integer[],
                %(errors)s::text[], %(delays)s::float8[]) AS r(park_id, position, sent, error, delay)
), before AS (
    SELECT w.park_id, w.owed, w.pending,
           greatest(w.delivered, coalesce(r.position, w.delivered)) AS delivered,
           r.sent, r.error, r.delay
    FROM webhook_feed_parks w JOIN r USING (park_id)
    FOR UPDATE OF w
), after AS (
    SELECT b.*,
           CASE WHEN b.delivered >= b.pending THEN 0 ELSE greatest(b.owed - b.sent, 0) END
               AS new_owed
    FROM before b
), parks AS (
    UPDATE webhook_feed_parks w SET
        delivered = a.delivered,
        owed = a.new_owed,
        oldest_owed_at = CASE WHEN a.new_owed = 0 THEN NULL ELSE (
            SELECT e.created_at FROM events e
            WHERE e.park_id = a.park_id AND e.position > a.delivered
            ORDER BY e.position LIMIT 1) END,
        failures = CASE WHEN a.error IS NULL THEN 0 ELSE w.failures + 1 END,
        last_error = a.error,
        last_attempt_at = now(),
        next_attempt_at = CASE
            WHEN a.error IS NOT NULL THEN now() + make_interval(secs => a.delay)
            WHEN a.pending > a.delivered THEN now()
        END
    FROM after a
    WHERE w.park_id = a.park_id
    RETURNING a.owed - a.new_owed AS settled
)
UPDATE webhook_feed SET owed = greatest(owed - (SELECT coalesce(sum(settled), 0) FROM parks), 0)
WHERE id

-- undelivered --
-- Events not delivered yet, and the age of the oldest: those not stamped yet
-- (counted up to a cap), those the dispatcher has not reached (positions are
-- consecutive: a subtraction) and those parks are owed (kept as they change).
-- A few index probes, whatever the history. Zero while webhooks were never on.
SELECT f.owed + (s.last_position - f.position) + u.n AS events,
       coalesce(extract(epoch FROM now() - least(
           (SELECT e.created_at FROM events e WHERE e.position = f.position + 1),
           (SELECT min(oldest_owed_at) FROM webhook_feed_parks),
           u.oldest
       )), 0)::float8 AS oldest_seconds
FROM webhook_feed f
CROSS JOIN events_sequencer s
CROSS JOIN LATERAL (
    SELECT count(*) AS n, min(created_at) AS oldest
    FROM (SELECT created_at FROM events WHERE position IS NULL LIMIT %(cap)s) x
) u
WHERE f.id
