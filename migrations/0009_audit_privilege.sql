-- Schema v9: the database dates every audit entry, links a statement's entries in
-- linear time, and remembers which closed months `audit verify` has checked.
--
-- Expand only. The code before this one never names `at`, `id` or the chain columns
-- in its audit inserts, and does not know the new table: it keeps working.

-- The insert's own moment, taken by the database. The app role may not name `at` at
-- all (service/roles.py grants it INSERT on the other columns only): a leaked password
-- cannot date an entry into a closed month or months ahead. clock_timestamp(), not
-- now(): now() is when the caller's transaction began, so a caller holding a
-- transaction open across midnight of the 1st would still write into the month
-- before, after `audit verify` had recorded it closed. (A BEFORE trigger cannot do
-- this instead: a row is routed to its month's partition before the partition's
-- triggers run, and may not move to another one from there.)
ALTER TABLE audit_log ALTER COLUMN at SET DEFAULT clock_timestamp();

-- The chain trigger, linear in the rows of one statement. 0003's version updated the
-- chain's head row for every entry: inside one transaction each update leaves a row
-- version that every later lookup of the head walks past (none can be pruned before
-- commit), so one INSERT of N entries cost O(N^2) (the park import: 90,000 rows in
-- minutes). Now the row trigger only reads the head; one statement-level trigger
-- moves every touched head once, at the end of the statement.
--
-- Entries this statement linked already are not in the head yet. Each row leaves a
-- transaction-local setting per chain naming the entry it linked (its `at` and `id`,
-- the primary key); the next row of the chain reads that entry back by its key and
-- continues from the seq and hash stored in it. Only a pointer is trusted from the
-- setting, never a hash, and only to an entry above the head (so this transaction's,
-- this statement's): a caller who rewrites the setting mid-statement can at most make
-- two of its own entries share a link, which `audit verify` names; it cannot make a
-- chain skip or hide an entry. (Finding the tail by the chain index instead depends
-- on statistics: on a new month's partition the planner takes the primary key's
-- range over the whole month, for every row, and the insert is quadratic again.)
--
-- The head stays the authority for where a chain continues: an entry the table lacks
-- but the head remembers (a deleted tail) is still continued from the head, leaving
-- the gap `audit verify` names. Entries above the head can only be this transaction's:
-- the stripe is locked until commit, and every statement's heads are moved by its own
-- statement trigger before another statement runs.
--
-- Inserting straight into a partition (only the owner may) skips the statement
-- trigger, which fires on audit_log itself: `audit verify` would name such entries as
-- written around the heads. Insert through audit_log.
CREATE OR REPLACE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    m       date := date_trunc('month', NEW.at AT TIME ZONE 'UTC')::date;
    stripes integer := audit_chain_stripes();
    -- Each backend starts at its own stripe, so writers rarely even probe each other's;
    -- a statement's later rows find the stripe its first row locked at once.
    start   integer := pg_backend_pid() % stripes;
    head    record;
    got     boolean := false;
    setting text;
    hint    text[];
    prev    record;
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

    -- The entry this transaction linked last into this chain: `at` as microseconds
    -- since the epoch, and id.
    setting := 'fleet_payouts.audit_tail_' || to_char(m, 'YYYYMM') || '_' || head.stripe;
    hint := string_to_array(current_setting(setting, true), '/');
    IF array_length(hint, 1) = 2 AND hint[1] ~ '^-?[0-9]{1,18}$' AND hint[2] ~ '^[0-9]{1,18}$'
    THEN
        SELECT a.chain_seq, a.chain_hash INTO prev
        FROM audit_log a
        WHERE a.at = to_timestamp(0) + hint[1]::bigint * interval '1 microsecond'
          AND a.id = hint[2]::bigint
          AND a.chain_stripe = head.stripe;
        IF FOUND AND prev.chain_seq > head.last_seq
           AND date_trunc('month', (to_timestamp(0) + hint[1]::bigint * interval '1 microsecond')
                                   AT TIME ZONE 'UTC')::date = m THEN
            head.last_seq := prev.chain_seq;
            head.last_hash := prev.chain_hash;
        END IF;
    END IF;

    -- Whatever the inserter put in these columns is overwritten.
    NEW.chain_stripe := head.stripe;
    NEW.chain_seq := head.last_seq + 1;
    NEW.chain_hash := sha256(head.last_hash || audit_log_canonical(
        NEW.id, NEW.at, NEW.actor_type, NEW.actor_id, NEW.park_id, NEW.action, NEW.outcome,
        NEW.request_id, NEW.payout_id, NEW.details, NEW.chain_stripe, NEW.chain_seq));
    PERFORM set_config(
        setting,
        (extract(epoch FROM NEW.at) * 1000000)::bigint || '/' || NEW.id,
        true);
    RETURN NEW;
END
$$;

-- Once per INSERT statement: each chain it extended gets its new last link.
CREATE FUNCTION audit_log_chain_heads() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    UPDATE audit_chain_heads h
    SET last_seq = n.last_seq,
        last_hash = n.last_hash,
        first_id = coalesce(h.first_id, n.first_id),
        last_id = n.last_id
    FROM (
        SELECT date_trunc('month', e.at AT TIME ZONE 'UTC')::date AS month,
               e.chain_stripe AS stripe,
               max(e.chain_seq) AS last_seq,
               (array_agg(e.chain_hash ORDER BY e.chain_seq DESC))[1] AS last_hash,
               (array_agg(e.id ORDER BY e.chain_seq))[1] AS first_id,
               (array_agg(e.id ORDER BY e.chain_seq DESC))[1] AS last_id
        FROM linked e
        WHERE e.chain_stripe IS NOT NULL
        GROUP BY 1, 2
    ) n
    WHERE h.month = n.month AND h.stripe = n.stripe AND n.last_seq > h.last_seq;
    RETURN NULL;
END
$$;

CREATE TRIGGER zz_audit_log_chain_heads AFTER INSERT ON audit_log
    REFERENCING NEW TABLE AS linked
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_chain_heads();
ALTER TABLE audit_log ENABLE ALWAYS TRIGGER zz_audit_log_chain_heads;

-- Closed months `audit verify` has walked, and the digest their chain heads had then.
-- A later run skips a month whose heads still have that digest (nothing was appended,
-- no head moved) and walks again any other; `audit verify --full` walks everything.
-- Append-only: a month verified again gets a new row, the newest counts. Written by
-- whoever runs `audit verify` with INSERT on it (the app role, as the daily unit runs,
-- and fleet_payouts_ops); a forged row gains nothing: it only ever skips a month
-- whose heads match it, and neither role can change entries or heads.
CREATE TABLE audit_verified_months (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    month        date NOT NULL CHECK (month = date_trunc('month', month)),
    entries      bigint NOT NULL CHECK (entries >= 0),
    legacy       bigint NOT NULL DEFAULT 0 CHECK (legacy >= 0),
    month_digest bytea NOT NULL CHECK (length(month_digest) = 32),
    verified_at  timestamptz NOT NULL DEFAULT now(),
    verified_by  text NOT NULL DEFAULT session_user
);
CREATE INDEX audit_verified_months_month ON audit_verified_months (month, id DESC);
