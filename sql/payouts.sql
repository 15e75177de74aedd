-- insert_instant --
-- The accepted instant payout, its job and its audit entry, in one statement:
-- they commit together or not at all, in one round trip. The job row is
-- written here rather than through procrastinate's Python defer (its table's
-- stable core: queue, task, priority, args; its insert trigger NOTIFYs the
-- workers at commit).
WITH job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
    VALUES (%(queue)s, %(task)s, %(priority)s, jsonb_build_object('payout_id', %(id)s::text))
    RETURNING id
), created AS (
    INSERT INTO payouts (id, park_id, kind, idempotency_key, request_fingerprint, requested_by,
                         request_id, requested_amount, max_amount, min_amount, fee_percent,
                         fee_fixed, job_id)
    SELECT %(id)s, %(park_id)s, 'instant', %(idempotency_key)s, %(request_fingerprint)s,
           %(requested_by)s, %(request_id)s, %(requested_amount)s, %(max_amount)s,
           %(min_amount)s, %(fee_percent)s, %(fee_fixed)s, job.id
    FROM job
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    SELECT 'user', requested_by, park_id, 'payout.instant.request', 'ok', request_id, id,
           %(details)s
    FROM created
)
SELECT * FROM created

-- press_instant --
-- The whole instant press in one round trip, in autocommit (migration 0014): the
-- park's row lock, the rules and the insert of the payout, its job and its audit
-- entry (or the replay's audit entry); a refusal writes nothing and names its code.
-- The payout's columns are NULL unless outcome is 'ok' or 'replay'; a new payout
-- carries the park's fee terms as they stood under its lock.
SELECT r.outcome, r.db_now, r.next_available_at, r.subscription_ended, (r.payout).*
FROM payouts_press_instant(
    %(id)s, %(park_id)s, %(idempotency_key)s, %(request_fingerprint)s, %(requested_by)s,
    %(request_id)s, %(requested_amount)s, %(max_amount)s, %(min_amount)s, %(cooldown)s,
    %(details)s::jsonb, %(queue)s, %(task)s, %(priority)s
) r

-- park_state --
-- All the rules need to know about one park: the flag and the end of the
-- subscription, the fee terms, the payout made with
-- this Idempotency-Key (if any), whether one is in flight, the newest instant
-- payout that counts for the cooldown, and the database's clock, the one
-- clock every host decides time rules by. The request path runs it right
-- after locking the park row, as a statement of its own: a statement that
-- waited for the lock still reads from the snapshot it started with, and
-- would miss the payout the lock holder just committed.
SELECT k.instant_payouts_enabled, k.hold_reason, k.instant_fee_percent, k.instant_fee_fixed,
       k.instant_payouts_until,
       coalesce(k.instant_payouts_until <= statement_timestamp(), false) AS subscription_ended,
       (SELECT x.id FROM payouts x
        WHERE x.park_id = k.park_id AND x.idempotency_key = %(idempotency_key)s) AS existing_id,
       (SELECT x.request_fingerprint FROM payouts x
        WHERE x.park_id = k.park_id AND x.idempotency_key = %(idempotency_key)s) AS existing_fingerprint,
       EXISTS (SELECT 1 FROM payouts x
               WHERE x.park_id = k.park_id AND x.status IN ('pending', 'processing')) AS in_flight,
       -- The cooldown: domain.COOLDOWN_EXEMPT names the same statuses
       -- (index payouts_instant_cooldown_v3).
       (SELECT max(x.created_at) FROM payouts x
        WHERE x.park_id = k.park_id AND x.kind = 'instant'
          AND x.status NOT IN ('failed', 'skipped', 'cancelled', 'returned')) AS last_counted_instant_at,
       statement_timestamp() AS db_now
FROM parks k
WHERE k.park_id = %(park_id)s

-- get --
-- One payout by id.
SELECT * FROM payouts WHERE id = %(id)s

-- get_for_park --
-- One payout by id, only if it belongs to the park (else "not found").
SELECT * FROM payouts WHERE id = %(id)s AND park_id = %(park_id)s

-- list_page --
-- Newest first, keyset pagination on (created_at, id).
SELECT * FROM payouts
WHERE park_id = %(park_id)s
  AND (%(after_created_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(after_created_at)s::timestamptz, %(after_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- take --
-- A worker takes the payout: pending -> processing, one more attempt, with
-- the park's Billing params, the database's clock, and whether the retry
-- window (for a payout that has ordered nothing yet) is over by that clock.
-- No row: the payout is final (or gone).
-- A periodic payout with the scan's balance snapshot and something to pay also
-- records its order here (recovery point ORDERED, as record_order does): one
-- round trip, not two. payouts_snapshot_order (migration 0016) decides, on the
-- row as locked; anything else is decided in Python after the take, as before.
UPDATE payouts p
SET status = 'processing', attempts = p.attempts + 1,
    amount = coalesce(payouts_snapshot_order(p, %(min_amount)s), p.amount),
    billing_params = CASE WHEN payouts_snapshot_order(p, %(min_amount)s) IS NOT NULL
                          THEN k.params ELSE p.billing_params END,
    ordered_at = CASE WHEN payouts_snapshot_order(p, %(min_amount)s) IS NOT NULL
                      THEN now() ELSE p.ordered_at END
FROM parks k
WHERE p.id = %(id)s AND k.park_id = p.park_id AND p.status IN ('pending', 'processing')
RETURNING p.*, k.params AS park_params, statement_timestamp() AS db_now,
          statement_timestamp() >= p.created_at + %(retry_window)s AS retry_window_over

-- record_order --
-- Recovery point: from this commit on, the order may reach Billing, and its
-- body is fixed for good (the trigger refuses any change). Only the run that
-- sets ordered_at orders first; a concurrent run finds no row and re-reads.
UPDATE payouts
SET available = %(available)s, amount = %(amount)s, currency = %(currency)s,
    billing_params = %(billing_params)s, fee_amount = %(fee_amount)s,
    net_amount = %(net_amount)s, ordered_at = now()
WHERE id = %(id)s AND status = 'processing' AND ordered_at IS NULL
RETURNING *

-- finish --
-- processing -> succeeded | failed | skipped, the park's clock and the
-- system audit entry, in one statement: they commit together or not at all,
-- in one round trip. No row: another run of the job finished it first.
WITH done AS (
    UPDATE payouts
    SET status = %(status)s,
        billing_payout_id = %(billing_payout_id)s,
        failure_code = %(failure_code)s,
        failure_message = %(failure_message)s,
        available = coalesce(%(available)s, available),
        currency = coalesce(%(currency)s, currency),
        completed_at = now()
    WHERE id = %(id)s AND status = 'processing'
    RETURNING *
), paid AS (
    UPDATE parks SET last_payout_at = greatest(parks.last_payout_at, done.completed_at)
    FROM done
    WHERE parks.park_id = done.park_id AND done.status = 'succeeded'
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)
    SELECT 'system', 'worker', park_id, 'payout.' || status, %(outcome)s, id, %(details)s
    FROM done
)
SELECT * FROM done

-- follow_up --
-- A periodic payout Billing refused for good (stale balance, new currency) is
-- followed at once by a new payout with its own id and no snapshot: its job
-- reads fresh figures. With its job, its audit entry and the park's attempt
-- clock, in one statement; nothing for a park that left the schedule.
-- Decided under the park's row lock (SPEC section 2): the locking read waits
-- for a transaction changing the park and then checks its committed row, so
-- a hold or a switch-off that committed first always wins.
WITH park AS (
    SELECT k.park_id FROM parks k
    WHERE k.park_id = (SELECT p.park_id FROM payouts p WHERE p.id = %(follows)s)
      AND k.periodic_payouts_enabled AND k.hold_reason IS NULL
    FOR NO KEY UPDATE
), job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
    SELECT %(queue)s, %(task)s, %(priority)s, jsonb_build_object('payout_id', %(id)s::text)
    FROM park
    RETURNING id
), created AS (
    INSERT INTO payouts (id, park_id, kind, max_amount, min_amount, follows, job_id)
    SELECT %(id)s, p.park_id, 'periodic', %(max_amount)s, %(min_amount)s, p.id, job.id
    FROM payouts p, job
    WHERE p.id = %(follows)s
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)
    SELECT 'system', 'worker', park_id, 'payout.periodic.create', 'ok', id,
           jsonb_build_object('follows', follows, 'reason', %(reason)s::text)
    FROM created
), attempt AS (
    UPDATE parks SET last_periodic_attempt_at = created.created_at
    FROM created WHERE parks.park_id = created.park_id
)
SELECT * FROM created

-- redrive --
-- A new job for an in-flight payout whose job is gone (the completer).
WITH job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
    VALUES (%(queue)s, %(task)s, %(priority)s, jsonb_build_object('payout_id', %(id)s::text))
    RETURNING id
)
UPDATE payouts SET job_id = job.id FROM job
WHERE payouts.id = %(id)s AND status IN ('pending', 'processing')
RETURNING job.id AS job_id

-- note_transient --
-- Keep the last transient problem visible to support while retries go on.
UPDATE payouts SET failure_message = %(failure_message)s
WHERE id = %(id)s AND status = 'processing'

-- settled_by --
-- The payout a Billing payout id already settles (migration 0020: at most one).
SELECT id FROM payouts WHERE billing_payout_id = %(billing_payout_id)s

-- instant_parks --
-- The product metric: distinct parks with a succeeded instant payout per window, from
-- the parks' latest successes counted by hour as payouts succeed (migrations/0015): a
-- few hundred rows, whatever the fleet and the history.
SELECT instant_payout_parks_since(now() - interval '1 day') AS d1,
       instant_payout_parks_since(now() - interval '7 days') AS d7,
       instant_payout_parks_since(now() - interval '30 days') AS d30

-- oldest_in_flight_seconds --
-- Age of the oldest payout still pending or processing, and of the oldest
-- order still waiting for Billing's answer (an order is never given up on:
-- past a bound, a person looks; see the runbook).
SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS seconds,
       coalesce(extract(epoch FROM now() - (
           SELECT min(ordered_at) FROM payouts
           WHERE status = 'processing' AND ordered_at IS NOT NULL)), 0)::float8 AS order_seconds
FROM payouts WHERE status IN ('pending', 'processing')

-- orphans --
-- In-flight payouts whose job is gone or finished: the completer re-drives them.
-- "Its job is live" as one primary-key probe per in-flight payout: a join lets the
-- planner hash the whole queue table (finished jobs included) every 15 s.
SELECT p.id, p.park_id, p.kind FROM payouts p
WHERE p.status IN ('pending', 'processing')
  AND p.updated_at < now() - make_interval(secs => %(min_age_seconds)s)
  AND (SELECT j.id FROM procrastinate_jobs j
       WHERE j.id = p.job_id AND j.status IN ('todo', 'doing')) IS NULL
ORDER BY p.created_at
LIMIT %(limit)s
FOR UPDATE OF p SKIP LOCKED

-- cancel --
-- pending -> cancelled, with its audit entry, in one statement. No row: not
-- this park's payout, or no longer pending (a worker took it first: the row
-- lock orders the two, and the loser's WHERE no longer matches).
WITH done AS (
    UPDATE payouts SET status = 'cancelled', completed_at = now()
    WHERE id = %(id)s AND park_id = %(park_id)s AND status = 'pending'
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    SELECT %(actor_type)s, %(user_id)s, park_id, 'payout.cancel', 'ok', %(request_id)s, id,
           %(details)s
    FROM done
)
SELECT * FROM done

-- manual_by_key --
-- The manual payout made with this admin Idempotency-Key, whichever park.
SELECT * FROM payouts WHERE kind = 'manual' AND idempotency_key = %(idempotency_key)s

-- awaiting_approval --
-- The park's manual payout awaiting approval, if any (one at most: unique index).
SELECT id FROM payouts WHERE park_id = %(park_id)s AND status = 'pending_approval'

-- insert_manual --
-- A manual payout awaiting a second admin, with its audit entry, in one
-- statement. No job yet: approval enqueues it. The approval deadline is
-- written by the database's clock.
WITH created AS (
    INSERT INTO payouts (id, park_id, kind, status, idempotency_key, request_fingerprint,
                         requested_by, request_id, requested_amount, max_amount, min_amount,
                         approval_reason, approval_expires_at)
    VALUES (%(id)s, %(park_id)s, 'manual', 'pending_approval', %(idempotency_key)s,
            %(request_fingerprint)s, %(requested_by)s, %(request_id)s, %(requested_amount)s,
            %(max_amount)s, %(min_amount)s, %(reason)s, now() + %(approval_window)s)
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    SELECT 'admin', requested_by, park_id, 'payout.manual.request', 'ok', request_id, id,
           %(details)s
    FROM created
)
SELECT * FROM created

-- manual_for_decision --
-- A manual payout and what deciding it needs, locked: run after its park is
-- locked, as a statement of its own (so it sees what the lock holder committed).
SELECT p.*, k.hold_reason,
       statement_timestamp() >= p.approval_expires_at AS approval_time_over,
       EXISTS (SELECT 1 FROM payouts x
               WHERE x.park_id = p.park_id AND x.status IN ('pending', 'processing')) AS in_flight
FROM payouts p JOIN parks k USING (park_id)
WHERE p.id = %(id)s AND p.kind = 'manual'
FOR UPDATE OF p

-- approve --
-- pending_approval -> pending by a second admin, its job and its audit entry,
-- in one statement. The database refuses the requester as approver
-- (payouts_four_eyes) and an approval after the deadline (payouts_guard).
WITH job AS (
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
    SELECT %(queue)s, %(task)s, %(priority)s, jsonb_build_object('payout_id', id::text)
    FROM payouts WHERE id = %(id)s AND status = 'pending_approval'
    RETURNING id
), approved AS (
    UPDATE payouts p SET status = 'pending', approved_by = %(user_id)s, approved_at = now(),
                         job_id = job.id
    FROM job
    WHERE p.id = %(id)s AND p.status = 'pending_approval'
    RETURNING p.*
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    SELECT 'admin', %(user_id)s, park_id, 'payout.manual.approve', 'ok', %(request_id)s, id,
           %(details)s
    FROM approved
)
SELECT * FROM approved

-- deny --
-- pending_approval -> denied, with the admin's reason and the audit entry.
WITH denied AS (
    UPDATE payouts SET status = 'denied', denied_by = %(user_id)s, denied_reason = %(reason)s,
                       completed_at = now()
    WHERE id = %(id)s AND status = 'pending_approval'
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    SELECT 'admin', %(user_id)s, park_id, 'payout.manual.deny', 'ok', %(request_id)s, id,
           %(details)s
    FROM denied
)
SELECT * FROM denied

-- expire --
-- Manual payouts whose approval time ran out, by the database's clock: expired,
-- each with a system audit entry. With an id, that one only (if it is due).
WITH expired AS (
    UPDATE payouts SET status = 'expired', completed_at = now()
    WHERE id IN (SELECT id FROM payouts
                 WHERE status = 'pending_approval'
                   AND approval_expires_at <= statement_timestamp()
                   AND (%(id)s::uuid IS NULL OR id = %(id)s::uuid)
                 ORDER BY approval_expires_at
                 LIMIT %(limit)s
                 FOR UPDATE SKIP LOCKED)
    RETURNING *
), entry AS (
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, payout_id, details)
    SELECT 'system', 'approval-expiry', park_id, 'payout.manual.expire', 'ok', id,
           jsonb_build_object('approval_expires_at', approval_expires_at,
                              'requested_by', requested_by)
    FROM expired
)
SELECT * FROM expired

-- pending_approval_count --
-- The approvals queue's length (gauge fleet_payouts_manual_payouts_pending_approval),
-- and how long its oldest request has waited.
SELECT count(*) AS waiting,
       coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS oldest_seconds
FROM payouts WHERE status = 'pending_approval'
