-- The instant press in one round trip (issue 21): the park's row lock, the rules and
-- the insert (payout, job, audit entry) in one function call, in autocommit. Written
-- on top of 0012 (the paid option, returns, manual payouts). Expand only: the
-- previous code's statements (parks lock, park_state, insert_instant) keep working
-- beside it, and nothing else changes.
--
-- Each statement of a volatile plpgsql function reads a fresh snapshot, so the state
-- read after the lock sees whatever the lock's previous holder committed (the reason
-- the Python path read it in a statement of its own). The time rules (cooldown, the
-- subscription's end) are judged by the database's clock read after the lock, as the
-- Python path's park_state statement did.
--
-- outcome: 'ok' (payout is the new one), 'replay' (payout is the one made with this
-- Idempotency-Key; its audit entry written), or a refusal's code, with nothing
-- written: the caller audits refusals (it owns their messages and details).
-- subscription_ended says why instant_payouts_disabled (details.reason).
-- The order of the rules is service/instant.py's and domain.instant_availability's:
--   park_not_found, idempotency_key_reused (or the replay), amount_above_limit and
--   amount_below_minimum (only when the switch is on), instant_payouts_disabled
--   (switch off or instant_payouts_until passed), park_on_hold, payout_in_progress,
--   cooldown_active (a returned payout no longer counts: payouts_instant_cooldown_v3).
-- An accepted payout carries the park's fee terms as they stand under its lock.
-- SECURITY INVOKER: it runs with the app role's own privileges (service/roles.py).
CREATE FUNCTION payouts_press_instant(
    p_id uuid,
    p_park_id text,
    p_idempotency_key text,
    p_request_fingerprint text,
    p_requested_by text,
    p_request_id text,
    p_requested_amount numeric,
    p_max_amount numeric,
    p_min_amount numeric,
    p_cooldown interval,
    p_details jsonb,
    p_queue text,
    p_task text,
    p_priority integer,
    OUT outcome text,
    OUT db_now timestamptz,
    OUT next_available_at timestamptz,
    OUT subscription_ended boolean,
    OUT payout payouts
) LANGUAGE plpgsql AS $$
DECLARE
    park record;
    job_id bigint;
BEGIN
    subscription_ended := false;
    -- Every decision about one park's payouts is serialised on its row.
    PERFORM 1 FROM parks WHERE park_id = p_park_id FOR UPDATE;
    IF NOT FOUND THEN
        db_now := clock_timestamp();
        outcome := 'park_not_found';
        RETURN;
    END IF;
    db_now := clock_timestamp();
    SELECT k.instant_payouts_enabled, k.hold_reason, k.instant_fee_percent,
           k.instant_fee_fixed,
           coalesce(k.instant_payouts_until <= db_now, false) AS subscription_ended,
           EXISTS (SELECT 1 FROM payouts x
                   WHERE x.park_id = k.park_id AND x.status IN ('pending', 'processing'))
               AS in_flight,
           -- The cooldown: domain.COOLDOWN_EXEMPT names the same statuses.
           (SELECT max(x.created_at) FROM payouts x
            WHERE x.park_id = k.park_id AND x.kind = 'instant'
              AND x.status NOT IN ('failed', 'skipped', 'cancelled', 'returned'))
               AS last_counted
    INTO park
    FROM parks k WHERE k.park_id = p_park_id;
    subscription_ended := park.subscription_ended;

    SELECT * INTO payout FROM payouts x
    WHERE x.park_id = p_park_id AND x.idempotency_key = p_idempotency_key;
    IF FOUND THEN
        IF payout.request_fingerprint IS DISTINCT FROM p_request_fingerprint THEN
            payout := NULL;
            outcome := 'idempotency_key_reused';
            RETURN;
        END IF;
        INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                               payout_id, details)
        VALUES ('user', p_requested_by, p_park_id, 'payout.instant.request', 'ok', p_request_id,
                payout.id, p_details || jsonb_build_object('replay', true));
        outcome := 'replay';
        RETURN;
    END IF;

    IF park.instant_payouts_enabled AND p_requested_amount > p_max_amount THEN
        outcome := 'amount_above_limit';
    ELSIF park.instant_payouts_enabled AND p_requested_amount < p_min_amount THEN
        outcome := 'amount_below_minimum';
    ELSIF NOT park.instant_payouts_enabled OR park.subscription_ended THEN
        outcome := 'instant_payouts_disabled';
    ELSIF park.hold_reason IS NOT NULL THEN
        outcome := 'park_on_hold';
    ELSIF park.in_flight THEN
        outcome := 'payout_in_progress';
    ELSIF park.last_counted IS NOT NULL AND park.last_counted + p_cooldown > db_now THEN
        outcome := 'cooldown_active';
        next_available_at := park.last_counted + p_cooldown;
    END IF;
    IF outcome IS NOT NULL THEN
        RETURN;
    END IF;

    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, args)
    VALUES (p_queue, p_task, p_priority, jsonb_build_object('payout_id', p_id::text))
    RETURNING id INTO job_id;
    INSERT INTO payouts (id, park_id, kind, idempotency_key, request_fingerprint, requested_by,
                         request_id, requested_amount, max_amount, min_amount, fee_percent,
                         fee_fixed, job_id)
    VALUES (p_id, p_park_id, 'instant', p_idempotency_key, p_request_fingerprint, p_requested_by,
            p_request_id, p_requested_amount, p_max_amount, p_min_amount,
            park.instant_fee_percent, park.instant_fee_fixed, job_id)
    RETURNING * INTO payout;
    INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id,
                           payout_id, details)
    VALUES ('user', p_requested_by, p_park_id, 'payout.instant.request', 'ok', p_request_id,
            payout.id, p_details);
    outcome := 'ok';
END
$$;
