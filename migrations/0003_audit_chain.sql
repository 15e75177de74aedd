-- Schema v3: an audit log nobody can quietly rewrite, and upkeep that never blocks a press.
--
-- Expand only. Code that inserts audit rows without knowing about the chain keeps
-- working: the new columns are nullable and a trigger fills them.
--
-- Tamper evidence. Every entry carries chain_hash = sha256(previous hash || the entry's
-- canonical content), computed here at insert, so every host's writes join the same
-- chains. One chain for the whole log would be a row that every press locks until it
-- commits; instead each month has 64 chains ("stripes") and an insert takes the first
-- stripe nobody holds (SKIP LOCKED): a press waits only if 64 audit-writing
-- transactions are in flight at once. A chain never crosses a month, so each monthly
-- partition verifies on its own (`fleet-payouts audit verify` streams them one by one)
-- and an archived month is summed up by its chain heads (audit_month_digest).
--
-- audit_chain_heads holds each chain's last link. Deleting a row leaves a gap in its
-- chain's seq; editing or swapping rows breaks their hashes; emptying a month or
-- cutting a chain's tail leaves entries the heads remember and the table lacks.

ALTER TABLE audit_log
    ADD COLUMN chain_stripe smallint,
    ADD COLUMN chain_seq    bigint,
    ADD COLUMN chain_hash   bytea;

-- Rows written before this migration carry no link; `audit verify` counts them apart.
-- Read after the ALTER above, which waited for every transaction that had inserted.
CREATE TABLE audit_chain_legacy (
    only_row     boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    max_id       bigint NOT NULL,
    chained_from timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_chain_legacy (max_id)
SELECT coalesce(
    pg_sequence_last_value(pg_get_serial_sequence('audit_log', 'id')::regclass),
    0);

-- The last link of each chain. Written only by the chain trigger (SECURITY DEFINER):
-- the app role has no privilege on it. fillfactor leaves room for HOT updates.
CREATE TABLE audit_chain_heads (
    month     date NOT NULL CHECK (month = date_trunc('month', month)),
    stripe    smallint NOT NULL CHECK (stripe >= 0),
    last_seq  bigint NOT NULL DEFAULT 0 CHECK (last_seq >= 0),
    last_hash bytea NOT NULL CHECK (length(last_hash) = 32),
    first_id  bigint,
    last_id   bigint,
    PRIMARY KEY (month, stripe)
) WITH (fillfactor = 50);

-- Months a DBA detached, exported and dropped (ops/runbooks/README.md, "Audit log
-- retention"): `audit verify` crosses them using the digest recorded here.
CREATE TABLE audit_archive (
    month         date PRIMARY KEY CHECK (month = date_trunc('month', month)),
    entries       bigint NOT NULL CHECK (entries >= 0),
    month_digest  bytea NOT NULL CHECK (length(month_digest) = 32),
    location      text NOT NULL,
    export_sha256 text NOT NULL CHECK (export_sha256 ~ '^[0-9a-f]{64}$'),
    archived_at   timestamptz NOT NULL DEFAULT now(),
    archived_by   text NOT NULL DEFAULT session_user
);

-- One field of the canonical form: 4-byte big-endian length, then the bytes; NULL is
-- length -1. service/audit_chain.py builds the same bytes on its own, so a verifier
-- never trusts a function an attacker with DDL rights could have replaced.
CREATE FUNCTION audit_chain_field(value bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(int4send(length(value)) || value, '\xffffffff'::bytea)
$$;

-- Everything an entry says, in a byte string that one value has exactly one of:
-- `at` as microseconds since the epoch (no time zone or DateStyle in it), details as
-- jsonb's own text form (keys sorted, fixed spacing). Version byte first.
CREATE FUNCTION audit_log_canonical(
    id bigint, at timestamptz, actor_type text, actor_id text, park_id text, action text,
    outcome text, request_id text, payout_id uuid, details jsonb,
    chain_stripe smallint, chain_seq bigint
) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT '\x01'::bytea
        || audit_chain_field(int8send(id))
        || audit_chain_field(int8send((extract(epoch FROM at) * 1000000)::bigint))
        || audit_chain_field(convert_to(actor_type, 'UTF8'))
        || audit_chain_field(convert_to(actor_id, 'UTF8'))
        || audit_chain_field(convert_to(park_id, 'UTF8'))
        || audit_chain_field(convert_to(action, 'UTF8'))
        || audit_chain_field(convert_to(outcome, 'UTF8'))
        || audit_chain_field(convert_to(request_id, 'UTF8'))
        || audit_chain_field(uuid_send(payout_id))
        || audit_chain_field(convert_to(details::text, 'UTF8'))
        || audit_chain_field(int2send(chain_stripe))
        || audit_chain_field(int8send(chain_seq))
$$;

-- The "previous hash" of a chain's first entry.
CREATE FUNCTION audit_chain_genesis(month date, stripe smallint) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(convert_to(
        'fleet-payouts audit_log ' || to_char(month, 'YYYY-MM') || '/' || stripe, 'UTF8'))
$$;

-- A month in one value: its chains' last links, in stripe order. Recorded in
-- audit_archive when the month is archived; printed by `audit verify` for every month.
CREATE FUNCTION audit_month_digest(month date) RETURNS bytea
LANGUAGE sql STABLE AS $$
    SELECT sha256(coalesce(
        string_agg(int2send(h.stripe) || int8send(h.last_seq) || h.last_hash, ''::bytea
                   ORDER BY h.stripe),
        ''::bytea))
    FROM audit_chain_heads h
    WHERE h.month = audit_month_digest.month AND h.last_seq > 0
$$;

-- How many chains a month has. A constant, not a setting: the verifier does not need
-- it (it reads the stripes it finds), but every host must agree on it.
CREATE FUNCTION audit_chain_stripes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 64 $$;

-- The heads of one month's chains, created ahead by the partition upkeep and, should
-- it not have run, by the first insert of the month.
CREATE FUNCTION audit_chain_open_month(m date) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO audit_chain_heads (month, stripe, last_hash)
    SELECT m, s, audit_chain_genesis(m, s::smallint)
    FROM generate_series(0, audit_chain_stripes() - 1) s
    ON CONFLICT DO NOTHING
$$;

-- Links the new entry into the first free chain of its month. SECURITY DEFINER: the app
-- role inserts audit rows but may not touch the heads. The fixed search_path keeps a
-- caller's temporary table from standing in for audit_chain_heads.
CREATE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    m       date := date_trunc('month', NEW.at AT TIME ZONE 'UTC')::date;
    stripes integer := audit_chain_stripes();
    -- Each backend starts at its own stripe, so writers rarely even probe each other's.
    start   integer := pg_backend_pid() % stripes;
    head    record;
    got     boolean := false;
BEGIN
    FOR i IN 0 .. stripes - 1 LOOP
        SELECT h.stripe, h.last_seq, h.last_hash INTO head
        FROM audit_chain_heads h
        WHERE h.month = m AND h.stripe = (start + i) % stripes
        FOR UPDATE SKIP LOCKED;
        IF FOUND THEN
            got := true;
            EXIT;
        END IF;
    END LOOP;
    IF NOT got THEN
        -- The month's chains do not exist yet, or every one is held: create them
        -- (idempotent), then queue for our own stripe.
        PERFORM audit_chain_open_month(m);
        SELECT h.stripe, h.last_seq, h.last_hash INTO STRICT head
        FROM audit_chain_heads h
        WHERE h.month = m AND h.stripe = start
        FOR UPDATE;
    END IF;

    -- Whatever the inserter put in these columns is overwritten.
    NEW.chain_stripe := head.stripe;
    NEW.chain_seq := head.last_seq + 1;
    NEW.chain_hash := sha256(head.last_hash || audit_log_canonical(
        NEW.id, NEW.at, NEW.actor_type, NEW.actor_id, NEW.park_id, NEW.action, NEW.outcome,
        NEW.request_id, NEW.payout_id, NEW.details, NEW.chain_stripe, NEW.chain_seq));
    UPDATE audit_chain_heads
    SET last_seq = NEW.chain_seq, last_hash = NEW.chain_hash,
        first_id = coalesce(first_id, NEW.id), last_id = NEW.id
    WHERE month = m AND stripe = head.stripe;
    RETURN NEW;
END
$$;

-- Triggers fire in name order: "zz_" makes this one last, so it hashes the row exactly
-- as it is stored. ENABLE ALWAYS: it fires under session_replication_role = replica
-- too, and so do the append-only guards (a superuser has to disable them by name).
CREATE TRIGGER zz_audit_log_chain BEFORE INSERT ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_chain();
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER zz_audit_log_chain;
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_append_only;
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER audit_log_no_truncate;
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'audit_log'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER audit_log_no_truncate', part);
    END LOOP;
END
$$;

-- Monthly partitions from the current month to `months_ahead` ahead; returns how many
-- it created. Replaces 0001's version (same signature: the previous release calls it).
--
-- Each month is created standalone and then ATTACHed: ATTACH takes SHARE UPDATE
-- EXCLUSIVE on audit_log, which neither readers nor inserts conflict with, where
-- CREATE TABLE ... PARTITION OF waited behind any long reader (a report, a pg_dump)
-- with every audit insert queued behind it. A month whose ATTACH still cannot get its
-- lock within lock_timeout is skipped; the caller retries (service/audit.py).
--
-- No DEFAULT partition, on purpose: with one, every ATTACH needs ACCESS EXCLUSIVE on
-- it (a long reader of the log blocks that), DETACH ... CONCURRENTLY (archiving) is not
-- allowed at all, and rows landing there block their month's ATTACH. Four months of
-- runway and the AuditPartitionsRunningOut alerts stand in for it.
--
-- SECURITY DEFINER: the app role calls it (hourly, from the workers) without any DDL
-- right; partitions belong to the owner and get the readonly role's SELECT through the
-- owner's default privileges.
CREATE OR REPLACE FUNCTION audit_log_ensure_partitions(months_ahead integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp SET lock_timeout = '200ms'
AS $$
DECLARE
    month_start timestamptz;
    part_name   text;
    created     integer := 0;
BEGIN
    -- The app role calls this with the owner's rights: it gets a year of runway at most.
    IF months_ahead NOT BETWEEN 0 AND 12 THEN
        RAISE EXCEPTION 'months_ahead must be between 0 and 12, not %', months_ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Another host is at it right now: its run covers this one.
    IF NOT pg_try_advisory_xact_lock(hashtext('fleet_payouts.audit_log_partitions')) THEN
        RETURN 0;
    END IF;
    FOR i IN 0..months_ahead LOOP
        month_start := (date_trunc('month', now() AT TIME ZONE 'UTC')
                        + make_interval(months => i)) AT TIME ZONE 'UTC';
        part_name := 'audit_log_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
        PERFORM audit_chain_open_month((month_start AT TIME ZONE 'UTC')::date);
        CONTINUE WHEN to_regclass(part_name) IS NOT NULL;
        BEGIN
            EXECUTE format(
                'CREATE TABLE %I (LIKE audit_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                part_name);
            -- Row triggers are cloned onto a partition at ATTACH; TRUNCATE triggers are not.
            EXECUTE format(
                'CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON %I '
                'FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change()',
                part_name);
            EXECUTE format('ALTER TABLE %I ENABLE ALWAYS TRIGGER audit_log_no_truncate',
                           part_name);
            EXECUTE format(
                'ALTER TABLE audit_log ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                part_name, month_start, month_start + interval '1 month');
            created := created + 1;
        EXCEPTION WHEN lock_not_available THEN
            RAISE WARNING 'audit_log partition % not attached: lock timeout (retried later)',
                part_name;
        END;
    END LOOP;
    RETURN created;
END
$$;

-- Indexes for every GET /v1/audit filter (park_id, actor_id and `at` exist since 0001).
-- ON ONLY: created on the parent alone, instantly, so this transaction holds no lock
-- that blocks inserts while an index is built. `fleet-payouts migrate` then builds each
-- partition's index CONCURRENTLY and attaches it (service/migrate.py); partitions
-- created later get theirs at ATTACH.
CREATE INDEX audit_log_action_at ON ONLY audit_log (action, at DESC, id DESC);
-- `audit verify` reads each month chain by chain.
CREATE INDEX audit_log_chain ON ONLY audit_log (chain_stripe, chain_seq);
