-- park_search --
-- Parks whose id starts with the prefix (LIKE's wildcards in it escaped by the caller).
SELECT park_id, instant_payouts_enabled, periodic_payouts_enabled, hold_reason, registered_at
FROM parks
WHERE park_id LIKE %(pattern)s ESCAPE '\'
ORDER BY park_id
LIMIT %(limit)s

-- in_flight --
-- The park's payout in flight, if any (at most one: payouts_one_in_flight_per_park).
SELECT * FROM payouts
WHERE park_id = %(park_id)s AND status IN ('pending', 'processing')

-- timeline --
-- One park's payouts, events and audit entries, newest first, keyset-paged on
-- (at, source, key): each part walks its park index newest first from the
-- cursor's time and stops at a page, and the merge keeps the page's newest.
-- source: 3 payout, 2 event, 1 audit; key orders rows of one source and time
-- (ids zero-padded, so text order is number order).
SELECT * FROM (
    (SELECT p.created_at AS at, 3 AS source, p.id::text COLLATE "C" AS key, p.id AS payout_id,
            p.kind, p.status, p.amount, p.currency, NULL::text AS type,
            NULL::text AS actor_type, p.requested_by AS actor_id, NULL::text AS action,
            NULL::text AS outcome, NULL::jsonb AS details
     FROM payouts p
     WHERE p.park_id = %(park_id)s AND p.created_at <= %(at)s::timestamptz
       AND (p.created_at, 3, p.id::text COLLATE "C")
           < (%(at)s::timestamptz, %(source)s::int, %(key)s::text COLLATE "C")
     ORDER BY p.created_at DESC, p.id DESC
     LIMIT %(limit)s)
    UNION ALL
    (SELECT e.created_at, 2, lpad(e.seq::text, 20, '0') COLLATE "C", e.payout_id,
            e.payout->>'kind', e.payout->>'status', (e.payout->>'amount')::numeric,
            e.payout->>'currency', e.type, NULL, NULL, NULL, NULL, NULL
     FROM events e
     WHERE e.park_id = %(park_id)s AND e.created_at <= %(at)s::timestamptz
       AND (e.created_at, 2, lpad(e.seq::text, 20, '0') COLLATE "C")
           < (%(at)s::timestamptz, %(source)s::int, %(key)s::text COLLATE "C")
     ORDER BY e.created_at DESC, e.seq DESC
     LIMIT %(limit)s)
    UNION ALL
    (SELECT a.at, 1, lpad(a.id::text, 20, '0') COLLATE "C", a.payout_id, NULL, NULL, NULL,
            NULL, NULL, a.actor_type, a.actor_id, a.action, a.outcome, a.details
     FROM audit_log a
     WHERE a.park_id = %(park_id)s AND a.at <= %(at)s::timestamptz
       AND (a.at, 1, lpad(a.id::text, 20, '0') COLLATE "C")
           < (%(at)s::timestamptz, %(source)s::int, %(key)s::text COLLATE "C")
     ORDER BY a.at DESC, a.id DESC
     LIMIT %(limit)s)
) merged
ORDER BY at DESC, source DESC, key DESC
LIMIT %(limit)s

-- payout_audit --
-- A payout's audit trail, newest first (through the park's index: the payout's
-- entries are a few among its park's).
SELECT id, at, actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details
FROM audit_log
WHERE park_id = %(park_id)s AND payout_id = %(payout_id)s
ORDER BY at DESC, id DESC
LIMIT %(limit)s

-- payout_events --
-- A payout's events, in the order they were written.
SELECT seq, type, created_at FROM events
WHERE park_id = %(park_id)s AND payout_id = %(payout_id)s
ORDER BY seq

-- now --
-- The database's clock: console sessions expire by it, as every time rule does.
SELECT now() AS now

-- approvals_queue --
-- Manual payouts waiting for a second admin, oldest first (SPEC section 9).
SELECT * FROM payouts
WHERE status = 'pending_approval'
ORDER BY created_at, id
LIMIT %(limit)s

-- signed_out --
-- Whether this session was signed out: the cookie is the browser's, so a copy of it
-- (stolen, or left in another browser) must not outlive the sign-out. Through the
-- actor's index, from the session's start.
SELECT EXISTS (
    SELECT 1 FROM audit_log
    WHERE actor_id = %(user_id)s AND at >= %(issued_at)s
      AND action = %(action)s AND outcome = 'ok'
      AND details->>'session' = %(session)s
) AS signed_out

-- lock_sign_ins --
-- One address's sign-ins one at a time, on every host: each counts the failures
-- before it and writes its own before the next counts.
SELECT pg_advisory_xact_lock(hashtextextended('console.sign_in ' || %(ip)s, 0))

-- failed_sign_ins --
-- Console sign-ins refused from one address within the window (the action's index).
SELECT count(*) AS n FROM audit_log
WHERE action = %(action)s AND outcome <> 'ok'
  AND at > now() - make_interval(mins => %(minutes)s)
  AND details->'client'->>'ip' = %(ip)s
