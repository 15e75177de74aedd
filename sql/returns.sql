-- cursor --
-- Where the reader is in Billing's returns feed (NULL: from the start).
SELECT cursor FROM billing_returns_cursor

-- save_cursor --
-- The feed's cursor after the page just applied, in the page's transaction.
UPDATE billing_returns_cursor SET cursor = %(cursor)s, updated_at = now()

-- lock_park --
-- The returned payout's park, locked before `apply` runs as a statement of its
-- own: `apply` recomputes the park's clocks from its payouts, and a statement
-- that waited for the park's lock still reads from the snapshot it started
-- with, so it would forget a payout of the park that succeeded meanwhile.
SELECT k.park_id FROM parks k
WHERE k.park_id = (SELECT p.park_id FROM payouts p WHERE p.id = %(id)s)
FOR NO KEY UPDATE

-- apply --
-- succeeded -> returned (the only way in: payouts_guard), the park on hold
-- and its clocks recomputed without the returned payout (it no longer counts
-- as the last payout nor as a periodic attempt: the due rule reads these
-- columns), the system audit entries; the event comes from the outbox
-- trigger. One statement. No row: the payout is not succeeded here.
WITH returned AS (
    UPDATE payouts SET status = 'returned', return_code = %(code)s,
                       returned_at = coalesce(%(returned_at)s::timestamptz, now())
    WHERE id = %(id)s AND status = 'succeeded'
    RETURNING *
), before AS (
    SELECT k.park_id, k.hold_reason FROM parks k JOIN returned r USING (park_id)
), held AS (
    UPDATE parks k
    SET hold_reason = left('payout_returned: ' || r.return_code, 500),
        hold_since = coalesce(k.hold_since, now()),
        hold_by = 'system',
        last_payout_at = (SELECT max(x.completed_at) FROM payouts x
                          WHERE x.park_id = k.park_id AND x.status = 'succeeded'
                            AND x.id <> r.id),
        last_periodic_attempt_at = (SELECT max(x.created_at) FROM payouts x
                                    WHERE x.park_id = k.park_id AND x.kind = 'periodic'
                                      AND x.status <> 'returned' AND x.id <> r.id),
        updated_at = now()
    FROM returned r
    WHERE k.park_id = r.park_id
    RETURNING k.park_id, k.hold_reason
), entries AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)
    SELECT 'system', 'returns-reader', r.park_id, 'payout.returned', 'ok', r.id,
           jsonb_build_object('code', r.return_code, 'returned_at', r.returned_at,
                              'amount', r.amount::text, 'currency', r.currency,
                              'fee_amount', r.fee_amount::text)
    FROM returned r
    UNION ALL
    SELECT 'system', 'returns-reader', h.park_id, 'park.update', 'ok', NULL,
           jsonb_build_object('changes', jsonb_build_object(
                                  'hold', jsonb_build_object('reason', h.hold_reason)),
                              'previous_hold', b.hold_reason)
    FROM held h JOIN before b USING (park_id)
)
SELECT * FROM returned

-- status --
-- Our status of the payout a return names (no row: no such payout).
SELECT status, return_code FROM payouts WHERE id = %(id)s

-- unmatched --
-- A return no succeeded payout of ours explains: kept for reconciliation
-- (returned_at_billing), never applied.
INSERT INTO billing_returns_unmatched (idempotency_key, code, returned_at, our_status)
VALUES (%(key)s, %(code)s, coalesce(%(returned_at)s::timestamptz, now()), %(our_status)s)
ON CONFLICT (idempotency_key) DO NOTHING
