-- due_candidates --
-- Parks due for a periodic payout (SPEC section 2), the longest-waiting first.
-- Read without locks: the batch is re-checked under lock before anything is written.
SELECT park_id FROM parks k
WHERE k.periodic_payouts_enabled
  AND greatest(k.registered_at, k.last_payout_at, k.last_periodic_attempt_at) <= now() - %(period)s
  -- "Nothing in flight" as one index probe per park (payouts_one_in_flight_per_park).
  -- NOT EXISTS lets the planner pick a join that, with statistics taken
  -- before a big batch, compares every candidate with every in-flight payout.
  AND (SELECT x.id FROM payouts x
       WHERE x.park_id = k.park_id AND x.status IN ('pending', 'processing')) IS NULL
ORDER BY greatest(k.registered_at, k.last_payout_at, k.last_periodic_attempt_at)
LIMIT %(limit)s

-- lock_due --
-- Of the candidates, those still due, locked until commit. SKIP LOCKED: a park
-- whose instant request holds its row now is simply left to the next tick.
SELECT park_id FROM parks k
WHERE k.park_id = ANY(%(park_ids)s)
  AND k.periodic_payouts_enabled
  AND greatest(k.registered_at, k.last_payout_at, k.last_periodic_attempt_at) <= now() - %(period)s
  -- "Nothing in flight" as one index probe per park (payouts_one_in_flight_per_park).
  -- NOT EXISTS lets the planner pick a join that, with statistics taken
  -- before a big batch, compares every candidate with every in-flight payout.
  AND (SELECT x.id FROM payouts x
       WHERE x.park_id = k.park_id AND x.status IN ('pending', 'processing')) IS NULL
ORDER BY k.park_id
FOR UPDATE OF k SKIP LOCKED

-- insert --
-- The batch's payouts, with the balance snapshot from /v1/balances/select, and
-- the parks' attempt clocks. The in-flight index has the last word.
WITH created AS (
    INSERT INTO payouts (id, park_id, kind, max_amount, available, currency, job_id)
    SELECT t.id, t.park_id, 'periodic', %(max_amount)s, t.available, t.currency, t.job_id
    FROM unnest(%(ids)s::uuid[], %(park_ids)s::text[], %(available)s::numeric[],
                %(currency)s::text[], %(job_ids)s::bigint[])
         AS t(id, park_id, available, currency, job_id)
    ON CONFLICT (park_id) WHERE status IN ('pending', 'processing') DO NOTHING
    RETURNING park_id, created_at
)
UPDATE parks SET last_periodic_attempt_at = created.created_at
FROM created
WHERE parks.park_id = created.park_id
