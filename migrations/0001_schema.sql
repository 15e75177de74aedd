-- Schema v1: parks, payouts and the append-only audit log.
--
-- The invariants of SPEC section 2 live here, not only in Python: three hosts
-- run the service against this one database, and a check in Python alone
-- loses the race the day two of them act on the same park.

CREATE TABLE parks (
    park_id                  text PRIMARY KEY
                             CHECK (park_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    -- A paid option: off until sales switch it on.
    instant_payouts_enabled  boolean NOT NULL DEFAULT false,
    periodic_payouts_enabled boolean NOT NULL DEFAULT true,
    -- Passed through to Billing with each payout (bank details, contract ids...).
    params                   jsonb NOT NULL DEFAULT '{}'::jsonb
                             CHECK (jsonb_typeof(params) = 'object'),
    registered_at            timestamptz NOT NULL DEFAULT now(),
    updated_at               timestamptz NOT NULL DEFAULT now(),
    -- Completion time of the last succeeded payout (either kind).
    last_payout_at           timestamptz,
    -- Creation time of the last periodic payout, whatever its outcome: a park
    -- with nothing to pay is asked about at most once per period.
    last_periodic_attempt_at timestamptz
);

-- The periodic scan walks parks in the order they become due; the index
-- holds only parks that can be due at all.
CREATE INDEX parks_periodic_anchor
    ON parks ((greatest(registered_at, last_payout_at, last_periodic_attempt_at)))
    WHERE periodic_payouts_enabled;


CREATE TABLE payouts (
    id                  uuid PRIMARY KEY,
    park_id             text NOT NULL REFERENCES parks (park_id),
    kind                text NOT NULL CHECK (kind IN ('instant', 'periodic')),
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'processing', 'succeeded', 'failed', 'skipped')),
    -- The client's Idempotency-Key and a digest of the request body it came with.
    idempotency_key     text CHECK (length(idempotency_key) BETWEEN 1 AND 128),
    request_fingerprint text,
    requested_by        text CHECK (length(requested_by) BETWEEN 1 AND 128),
    request_id          text,
    requested_amount    numeric(18, 2) CHECK (requested_amount > 0),
    -- PAYOUT_MAX_AMOUNT in force when the payout was created: the cap is
    -- checked by the database against the value the decision was made with.
    max_amount          numeric(18, 2) NOT NULL CHECK (max_amount > 0),
    -- Balance Billing reported for the current attempt.
    available           numeric(18, 2) CHECK (available >= 0),
    amount              numeric(18, 2),
    currency            text CHECK (currency ~ '^[A-Z]{3}$'),
    -- Exactly what was (or will be) sent to Billing, so a retry sends the
    -- same body under the same key.
    billing_params      jsonb,
    -- Recovery point: set in the transaction that commits to calling
    -- POST /v1/payouts. From then on the outcome is "maybe": it is settled
    -- with GET /v1/payouts/{id} before ordering again.
    ordered_at          timestamptz,
    billing_payout_id   text,
    failure_code        text,
    failure_message     text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    job_id              bigint,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    completed_at        timestamptz,

    -- An amount exists only beside the balance it was decided on.
    CONSTRAINT payouts_amount_has_balance CHECK (
        amount IS NULL OR available IS NOT NULL
    ),
    CONSTRAINT payouts_amount_within_limits CHECK (
        amount > 0
        AND amount <= max_amount
        AND amount <= available
        AND (requested_amount IS NULL OR amount <= requested_amount)
    ),
    CONSTRAINT payouts_order_is_complete CHECK (
        ordered_at IS NULL OR (amount IS NOT NULL AND currency IS NOT NULL AND billing_params IS NOT NULL)
    ),
    CONSTRAINT payouts_final_has_completed_at CHECK (
        (status IN ('succeeded', 'failed', 'skipped')) = (completed_at IS NOT NULL)
    ),
    CONSTRAINT payouts_succeeded_is_complete CHECK (
        status <> 'succeeded'
        OR (amount IS NOT NULL AND currency IS NOT NULL AND billing_payout_id IS NOT NULL)
    ),
    CONSTRAINT payouts_failed_has_code CHECK (status <> 'failed' OR failure_code IS NOT NULL),
    CONSTRAINT payouts_instant_has_requester CHECK (
        (kind = 'instant') = (idempotency_key IS NOT NULL AND requested_by IS NOT NULL)
    )
);

-- At most one payout per park in flight.
CREATE UNIQUE INDEX payouts_one_in_flight_per_park
    ON payouts (park_id) WHERE status IN ('pending', 'processing');

-- At most one payout per (park, Idempotency-Key).
CREATE UNIQUE INDEX payouts_park_idempotency_key
    ON payouts (park_id, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- GET /v1/payouts: newest first, keyset pagination.
CREATE INDEX payouts_park_created ON payouts (park_id, created_at DESC, id DESC);

-- Cooldown: the newest instant payout that still counts.
CREATE INDEX payouts_instant_cooldown ON payouts (park_id, created_at DESC)
    WHERE kind = 'instant' AND status NOT IN ('failed', 'skipped');

-- The product metric: distinct parks with a succeeded instant payout.
CREATE INDEX payouts_instant_succeeded ON payouts (completed_at, park_id)
    WHERE kind = 'instant' AND status = 'succeeded';

-- The completer and the "oldest in flight" gauge.
CREATE INDEX payouts_in_flight_created ON payouts (created_at)
    WHERE status IN ('pending', 'processing');


-- A payout moves only forward along the state machine, its identity never
-- changes, and a final payout is frozen: corrections are new rows, never edits.
CREATE FUNCTION payouts_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Every payout is born pending, with nothing ordered yet.
        -- (An unknown status is left to the CHECK constraint to name.)
        IF NEW.status IN ('processing', 'succeeded', 'failed', 'skipped')
           OR NEW.ordered_at IS NOT NULL OR NEW.completed_at IS NOT NULL
           OR NEW.billing_payout_id IS NOT NULL THEN
            RAISE EXCEPTION 'a payout is created pending, with no order or outcome (payout %)', NEW.id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'payouts are records: DELETE is refused (payout %)', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.id <> OLD.id OR NEW.park_id <> OLD.park_id OR NEW.kind <> OLD.kind
       OR NEW.idempotency_key IS DISTINCT FROM OLD.idempotency_key
       OR NEW.requested_amount IS DISTINCT FROM OLD.requested_amount
       OR NEW.requested_by IS DISTINCT FROM OLD.requested_by
       OR NEW.max_amount <> OLD.max_amount
       OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'payout % : identity columns are immutable', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF OLD.status IN ('succeeded', 'failed', 'skipped') THEN
        RAISE EXCEPTION 'payout % is final (%): it cannot change', OLD.id, OLD.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NOT (
        (OLD.status = 'pending' AND NEW.status IN ('pending', 'processing'))
        OR OLD.status = 'processing'
    ) THEN
        RAISE EXCEPTION 'payout %: % -> % is not a valid transition', OLD.id, OLD.status, NEW.status
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    -- Once an order may have reached Billing, its amount and body are fixed
    -- unless Billing refused it (insufficient_funds clears ordered_at first).
    IF OLD.ordered_at IS NOT NULL AND NEW.ordered_at IS NOT NULL AND (
        NEW.amount IS DISTINCT FROM OLD.amount
        OR NEW.currency IS DISTINCT FROM OLD.currency
        OR NEW.billing_params IS DISTINCT FROM OLD.billing_params) THEN
        RAISE EXCEPTION 'payout %: the order sent to Billing cannot change', OLD.id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER payouts_guard BEFORE INSERT OR UPDATE OR DELETE ON payouts
    FOR EACH ROW EXECUTE FUNCTION payouts_guard();


-- The audit log: every user action, accepted or refused, for years.
-- Range-partitioned by month so old months can be detached and archived
-- without touching the live one; append-only, enforced below.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor_type  text NOT NULL CHECK (actor_type IN ('user', 'admin', 'system')),
    actor_id    text,
    park_id     text,
    action      text NOT NULL,
    outcome     text NOT NULL,
    request_id  text,
    payout_id   uuid,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(details) = 'object'),
    PRIMARY KEY (at, id)
) PARTITION BY RANGE (at);

CREATE INDEX audit_log_park_at ON audit_log (park_id, at DESC, id DESC);
CREATE INDEX audit_log_actor_at ON audit_log (actor_id, at DESC, id DESC);
CREATE INDEX audit_log_at ON audit_log (at DESC, id DESC);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- Row triggers on a partitioned table are cloned onto every partition,
-- present and future. TRUNCATE triggers are not: the partition function adds
-- one to each partition it creates.
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();

-- Creates the monthly partitions from the current month to `months_ahead`
-- months ahead; returns how many it created. Safe to call concurrently from
-- every host (advisory lock) and as often as you like.
CREATE FUNCTION audit_log_ensure_partitions(months_ahead integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz;
    part_name   text;
    created     integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('fleet_payouts.audit_log_partitions'));
    FOR i IN 0..months_ahead LOOP
        month_start := (date_trunc('month', now() AT TIME ZONE 'UTC')
                        + make_interval(months => i)) AT TIME ZONE 'UTC';
        part_name := 'audit_log_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
        IF to_regclass(part_name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L)',
                part_name, month_start, month_start + interval '1 month');
            EXECUTE format(
                'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %I '
                'FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()',
                part_name);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END
$$;

-- How many whole months ahead of the current one are covered: the alert on
-- it fires long before an INSERT could fail for want of a partition.
CREATE FUNCTION audit_log_months_ahead() RETURNS integer LANGUAGE sql STABLE AS $$
    SELECT count(*)::integer
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'audit_log'::regclass
      AND c.relname > 'audit_log_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')
$$;
