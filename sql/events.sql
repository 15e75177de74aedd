-- sequence --
-- Stamp the committed events that have no position yet (migrations/0008):
-- called before reading, so an event is readable once it has committed.
SELECT events_sequence(%(batch)s) AS stamped

-- page --
-- Every park's events after the cursor, in position order. The sequencer's
-- last position comes back even when the page is empty (a cursor past it was
-- never issued), with the oldest position kept: one indexed query either way.
SELECT e.seq, e.position, e.type, e.created_at, e.payout::text AS payout,
       s.last_position, o.oldest
FROM events_sequencer s
CROSS JOIN LATERAL (
    SELECT coalesce(min(position), s.last_position + 1) AS oldest
    FROM events WHERE position IS NOT NULL
) o
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE e.position > %(after)s
    ORDER BY e.position
    LIMIT %(limit)s
) e ON true
ORDER BY e.position

-- park_page --
-- One park's events after the cursor, in position order (as `page`).
SELECT e.seq, e.position, e.type, e.created_at, e.payout::text AS payout,
       s.last_position, o.oldest
FROM events_sequencer s
CROSS JOIN LATERAL (
    SELECT coalesce(min(position), s.last_position + 1) AS oldest
    FROM events WHERE position IS NOT NULL
) o
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE e.park_id = %(park_id)s AND e.position > %(after)s
    ORDER BY e.position
    LIMIT %(limit)s
) e ON true
ORDER BY e.position

-- legacy_position --
-- A v5 cursor (xid, seq) as a position: just before the first event it had not
-- reached, so nothing is skipped (events of the deploy's moments may come
-- twice). NULL when it cannot be one we issued (past the oldest running
-- transaction: from the future, or from before a restore into a fresh cluster).
SELECT CASE WHEN %(xid)s::xid8 < pg_snapshot_xmin(pg_current_snapshot()) THEN
           coalesce(
               (SELECT min(e.position) FROM events e
                WHERE (e.xid, e.seq) > (%(xid)s::xid8, %(seq)s::bigint)),
               (SELECT last_position + 1 FROM events_sequencer)
           ) - 1
       END AS position

-- expire --
-- Delete one batch of the oldest events past retention (migrations/0008).
SELECT events_expire(%(days)s, %(batch)s) AS deleted
