-- due_candidates --
-- Parks due for a periodic payout (SPEC section 2; the rule: migrations/0018), the
-- longest-waiting first.
-- Read without locks: the batch is re-checked under lock before anything is written.
SELECT park_id FROM parks k
WHERE park_periodic_due(k.periodic_payouts_enabled, k.hold_reason, k.registered_at,
                        k.last_payout_at, k.last_periodic_attempt_at, %(period)s, now())
  -- "Nothing in flight" as one index probe per park (payouts_one_in_flight_per_park).
  -- NOT EXISTS lets the planner pick a join that, with statistics taken
  -- before a big batch, compares every candidate with every in-flight payout.
  AND (SELECT x.id FROM payouts x
       WHERE x.park_id = k.park_id AND x.status IN ('pending', 'processing')) IS NULL
ORDER BY park_periodic_anchor(k.registered_at, k.last_payout_at, k.last_periodic_attempt_at)
LIMIT %(limit)s

-- lock_due --
-- Of the candidates, those still due, locked until commit. SKIP LOCKED: a park
-- whose instant request holds its row now is simply left to the next tick.
-- "Nothing in flight" is not asked again: a payout that became in flight since the
-- candidates were read makes the insert's ON CONFLICT skip the park.
SELECT park_id FROM parks k
WHERE k.park_id = ANY(%(park_ids)s)
  AND park_periodic_due(k.periodic_payouts_enabled, k.hold_reason, k.registered_at,
                        k.last_payout_at, k.last_periodic_attempt_at, %(period)s, now())
ORDER BY k.park_id
FOR UPDATE OF k SKIP LOCKED

-- insert --
-- The batch's payouts, with the balance snapshot from /v1/balances/select
-- where Billing gave a usable one, their jobs, their audit entries and the
-- parks' attempt clocks, in one statement. The in-flight index has the last word
-- ("nothing in flight", asked once before, by due_candidates): a park with a payout
-- in flight gets none of these, and the statement's row count is the payouts made.
-- Each payout's job id is drawn first, so that only a payout inserted gets a job.
WITH input AS (
    SELECT t.*, nextval('procrastinate_jobs_id_seq'::regclass) AS job_id
    FROM unnest(%(ids)s::uuid[], %(park_ids)s::text[], %(available)s::numeric[],
                %(currency)s::text[]) AS t(id, park_id, available, currency)
), created AS (
    INSERT INTO payouts (id, park_id, kind, max_amount, min_amount, available, currency, job_id)
    SELECT i.id, i.park_id, 'periodic', %(max_amount)s, %(min_amount)s, i.available,
           i.currency, i.job_id
    FROM input i
    ON CONFLICT (park_id) WHERE status IN ('pending', 'processing') DO NOTHING
    RETURNING id, park_id, available, currency, created_at, job_id
), jobs AS (
    INSERT INTO procrastinate_jobs (id, queue_name, task_name, priority, args)
    SELECT job_id, %(queue)s, %(task)s, %(priority)s, jsonb_build_object('payout_id', id::text)
    FROM created
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)
    SELECT 'system', 'periodic-scan', park_id, 'payout.periodic.create', 'ok', id,
           jsonb_build_object('snapshot', CASE WHEN available IS NULL THEN NULL ELSE
               jsonb_build_object('available', available::text, 'currency', currency) END)
    FROM created
)
UPDATE parks SET last_periodic_attempt_at = created.created_at
FROM created
WHERE parks.park_id = created.park_id
