-- create_seen --
-- This session's copy of Billing's list. Billing's pages stream into it, so
-- the process holds one page whatever the window; the session owns it, so
-- hosts reconciling at once never see each other's.
CREATE TEMPORARY TABLE reconcile_billing (
    key        text NOT NULL,
    key_id     uuid,  -- the key as one of our payout ids, when it can be one
    billing_id text NOT NULL,
    park_id    text NOT NULL,
    amount     numeric NOT NULL,
    currency   text NOT NULL,
    created_at timestamptz NOT NULL,
    fee        numeric,  -- SPEC 8: Billing's record of our fee
    status     text      -- "done", or "returned" once the bank sent it back
)

-- copy_seen --
-- One page of Billing's list into the session's copy.
COPY reconcile_billing (key, key_id, billing_id, park_id, amount, currency, created_at, fee,
                       status) FROM STDIN

-- index_seen_by_key --
-- Our payouts are matched to Billing's by key.
CREATE INDEX ON reconcile_billing (key_id)

-- index_seen_by_time --
-- Billing's side is walked in (created_at, key) order, a page at a time.
CREATE INDEX ON reconcile_billing (created_at, key)

-- analyze_seen --
-- Temporary tables get no autovacuum statistics: plan the joins on real ones.
ANALYZE reconcile_billing

-- drop_seen --
-- The copy is per run: the next run on this pooled connection starts afresh.
DROP TABLE IF EXISTS reconcile_billing

-- billing_side --
-- Billing's payouts made in [since, until) that no payout of ours explains,
-- that ours explains differently, or that are ours but did not end paid;
-- in flight is not a mismatch yet. Keyset pages on (created_at, key).
-- A payout returned here was paid there first: it is ours and paid, like a
-- succeeded one. Billing's fee must be ours (fee_differs), and a payout
-- Billing says was returned must be returned here too (returned_at_billing).
SELECT b.key, b.billing_id, b.park_id, b.amount, b.currency, b.created_at, b.fee, b.status,
       p.id AS our_id, p.status AS our_status, p.park_id AS our_park_id,
       p.amount AS our_amount, p.currency AS our_currency, p.failure_code AS our_failure_code,
       p.fee_amount AS our_fee
FROM reconcile_billing b
LEFT JOIN payouts p ON p.id = b.key_id
WHERE b.created_at >= %(since)s AND b.created_at < %(until)s
  AND (%(after_at)s::timestamptz IS NULL OR (b.created_at, b.key) > (%(after_at)s, %(after_key)s))
  AND (p.id IS NULL
       OR p.status NOT IN ('succeeded', 'returned', 'pending', 'processing')
       OR (p.status IN ('succeeded', 'returned')
           AND (p.amount IS DISTINCT FROM b.amount
                OR p.currency IS DISTINCT FROM b.currency
                OR p.park_id <> b.park_id
                OR p.fee_amount IS DISTINCT FROM b.fee
                OR (b.status = 'returned' AND p.status <> 'returned'))))
ORDER BY b.created_at, b.key
LIMIT %(limit)s

-- ours_unseen --
-- Our payouts that succeeded in [since, until) and are not in Billing's list
-- (taken a little wider than the window): each is then asked about by key.
-- Keyset pages on (completed_at, id).
SELECT p.id, p.park_id, p.amount, p.currency, p.completed_at, p.billing_payout_id
FROM payouts p
WHERE p.status IN ('succeeded', 'returned')
  AND p.completed_at >= %(since)s AND p.completed_at < %(until)s
  AND (%(after_at)s::timestamptz IS NULL
       OR (p.completed_at, p.id) > (%(after_at)s, %(after_key)s::uuid))
  AND NOT EXISTS (SELECT 1 FROM reconcile_billing b WHERE b.key_id = p.id)
ORDER BY p.completed_at, p.id
LIMIT %(limit)s

-- now --
-- The database's clock: the one every time rule uses.
SELECT now() AS now

-- daily_window --
-- The last %(days)s days up to now, on the database's clock.
SELECT now() - make_interval(days => %(days)s) AS since, now() AS until

-- record_run --
-- One daily run's result; the gauge on every worker reads the latest.
INSERT INTO billing_reconciliations (since, until, mismatches, by_kind)
VALUES (%(since)s, %(until)s, %(mismatches)s, %(by_kind)s)

-- latest_run --
-- The latest daily run, for fleet_payouts_reconciliation_mismatches.
SELECT mismatches, extract(epoch FROM finished_at)::float8 AS finished_at
FROM billing_reconciliations
ORDER BY id DESC
LIMIT 1

-- unmatched_returns --
-- Returns Billing reported in [since, until) that no succeeded payout of ours
-- explained (kept by the returns reader, never applied).
SELECT idempotency_key, code, returned_at, our_status FROM billing_returns_unmatched
WHERE returned_at >= %(since)s AND returned_at < %(until)s
ORDER BY returned_at, idempotency_key
