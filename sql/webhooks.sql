-- start --
-- Webhooks are on: the dispatcher's place in the feed, from the first event
-- on, the first time only.
INSERT INTO webhook_state (xid, seq) VALUES ('0', 0) ON CONFLICT (id) DO NOTHING

-- acquire --
-- One round at a time: a round leases the dispatcher's row for `seconds`
-- (longer than a round can last), or finds it leased and does nothing.
UPDATE webhook_state
SET lease_holder = %(holder)s, lease_until = now() + make_interval(secs => %(seconds)s)
WHERE id AND (lease_until IS NULL OR lease_until < now())
RETURNING lease_holder

-- release --
-- The round is over: the next one may start at once.
UPDATE webhook_state SET lease_until = NULL WHERE id AND lease_holder = %(holder)s

-- hand_out --
-- The next events of the feed (readable ones only, as GET /v1/events reads
-- them) are handed to their parks: a park's newest becomes its pending mark,
-- a park met for the first time is owed nothing from before the cursor, and
-- the cursor moves past the batch. The state row's lock serialises dispatchers.
WITH state AS (
    SELECT xid, seq FROM webhook_state WHERE id FOR UPDATE
), batch AS (
    SELECT e.xid, e.seq, e.park_id
    FROM state s
    CROSS JOIN LATERAL (
        SELECT xid, seq, park_id FROM events e
        WHERE (e.xid, e.seq) > (s.xid, s.seq)
          AND e.xid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY e.xid, e.seq
        LIMIT %(limit)s
    ) e
), newest AS (
    SELECT DISTINCT ON (park_id) park_id, xid, seq
    FROM batch
    ORDER BY park_id, xid DESC, seq DESC
), handed AS (
    INSERT INTO webhook_parks AS w
        (park_id, delivered_xid, delivered_seq, pending_xid, pending_seq, next_attempt_at)
    SELECT n.park_id, s.xid, s.seq, n.xid, n.seq, now()
    FROM newest n, state s
    ON CONFLICT (park_id) DO UPDATE
    SET pending_xid = excluded.pending_xid,
        pending_seq = excluded.pending_seq,
        -- A park waiting out a backoff keeps waiting; an idle one is due now.
        next_attempt_at = coalesce(w.next_attempt_at, excluded.next_attempt_at)
    WHERE (excluded.pending_xid, excluded.pending_seq) > (w.pending_xid, w.pending_seq)
), last AS (
    SELECT xid, seq FROM batch ORDER BY xid DESC, seq DESC LIMIT 1
)
UPDATE webhook_state s SET xid = last.xid, seq = last.seq, updated_at = now()
FROM last
RETURNING (SELECT count(*) FROM batch) AS handed

-- due --
-- The parks whose delivery is due, soonest first, each with the events it is
-- owed, oldest first (at most per_park of them). A park owed events that are
-- gone (a retention DELETE) comes back once, with no event, to be cleared.
SELECT w.park_id, w.failures, w.pending_xid::text AS pending_xid, w.pending_seq,
       e.seq, e.xid::text AS xid, e.type, e.created_at, e.payout::text AS payout
FROM (
    SELECT * FROM webhook_parks
    WHERE next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT %(parks)s
) w
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE e.park_id = w.park_id
      AND (e.xid, e.seq) > (w.delivered_xid, w.delivered_seq)
      AND (e.xid, e.seq) <= (w.pending_xid, w.pending_seq)
    ORDER BY e.xid, e.seq
    LIMIT %(per_park)s
) e ON true
ORDER BY w.next_attempt_at, w.park_id, e.xid, e.seq

-- record --
-- A round's outcome per park: delivered up to (xid, seq) when anything went
-- through (NULL: nothing did), and the error that stopped it with the delay
-- before the next attempt (NULL: no error). A park another round has already
-- taken further is left alone, so positions never move back.
WITH r AS (
    SELECT park_id, xid::xid8 AS xid, seq, error, delay
    FROM unnest(%(park_ids)s::text[], %(xids)s::text[], %(seqs)s::bigint[],
                %(errors)s::text[], %(delays)s::float8[]) AS r(park_id, xid, seq, error, delay)
)
UPDATE webhook_parks w SET
    delivered_xid = coalesce(r.xid, w.delivered_xid),
    delivered_seq = coalesce(r.seq, w.delivered_seq),
    failures = CASE WHEN r.error IS NULL THEN 0 ELSE w.failures + 1 END,
    last_error = r.error,
    last_attempt_at = now(),
    next_attempt_at = CASE
        WHEN r.error IS NOT NULL THEN now() + make_interval(secs => r.delay)
        WHEN (w.pending_xid, w.pending_seq)
             > (coalesce(r.xid, w.delivered_xid), coalesce(r.seq, w.delivered_seq)) THEN now()
    END
FROM r
WHERE w.park_id = r.park_id
  AND (r.xid IS NULL OR (r.xid, r.seq) > (w.delivered_xid, w.delivered_seq))

-- undelivered --
-- Events not delivered yet, and the age of the oldest: those the dispatcher
-- has not reached, and those parks are still owed. Zero while webhooks have
-- never been switched on.
WITH ahead AS (
    SELECT count(*) AS n, min(e.created_at) AS oldest
    FROM webhook_state s
    JOIN events e ON (e.xid, e.seq) > (s.xid, s.seq)
), owed AS (
    SELECT count(*) AS n, min(e.created_at) AS oldest
    FROM webhook_parks w
    JOIN events e ON e.park_id = w.park_id
                 AND (e.xid, e.seq) > (w.delivered_xid, w.delivered_seq)
                 AND (e.xid, e.seq) <= (w.pending_xid, w.pending_seq)
    WHERE w.next_attempt_at IS NOT NULL
)
SELECT ahead.n + owed.n AS n,
       coalesce(extract(epoch FROM now() - least(ahead.oldest, owed.oldest)), 0)::float8
           AS oldest_seconds
FROM ahead, owed
