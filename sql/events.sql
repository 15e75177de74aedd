-- page --
-- Every park's events after the cursor, in commit order: only positions below
-- the snapshot's xmin, so nothing can later commit behind the cursor (see
-- migrations/0005_events.sql). The horizon row comes back even when the page
-- is empty: one indexed query either way.
WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT h.xmin::text AS horizon, e.seq, e.xid::text AS xid, e.type, e.created_at,
       e.payout::text AS payout
FROM horizon h
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE (e.xid, e.seq) > (%(after_xid)s::xid8, %(after_seq)s::bigint)
      AND e.xid < h.xmin
    ORDER BY e.xid, e.seq
    LIMIT %(limit)s
) e ON true

-- park_page --
-- One park's events after the cursor, in commit order (as `page`).
WITH horizon AS (SELECT pg_snapshot_xmin(pg_current_snapshot()) AS xmin)
SELECT h.xmin::text AS horizon, e.seq, e.xid::text AS xid, e.type, e.created_at,
       e.payout::text AS payout
FROM horizon h
LEFT JOIN LATERAL (
    SELECT * FROM events e
    WHERE e.park_id = %(park_id)s
      AND (e.xid, e.seq) > (%(after_xid)s::xid8, %(after_seq)s::bigint)
      AND e.xid < h.xmin
    ORDER BY e.xid, e.seq
    LIMIT %(limit)s
) e ON true
