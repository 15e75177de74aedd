-- Schema v19: the audit chain's trigger links each entry by one index probe whatever the
-- statistics say (issue 16: the periodic scan of 80,000 parks took 7-8x its baseline).
--
-- 0009's trigger finds the entry this statement linked last in a chain by its primary
-- key (`at`, id), named in a transaction-local setting. On a month's partition whose
-- statistics were taken while it was small (the first days of a month, or any ANALYZE
-- before a big batch), the planner thought a sequential scan of the partition, or a walk
-- of audit_log_chain on the stripe alone, as cheap as the probe: every entry then read
-- every earlier one, and one INSERT of N entries cost O(N^2) again -- 1.5-3.5 ms an
-- entry at 10,000-20,000 entries, most of a 1,000-park batch's time.
--
-- Now the setting also carries the entry's seq, so the lookup pins every column of
-- both unique-enough indexes (the primary key and audit_log_chain), and sequential
-- scans are off inside the function: either index is one probe. The lookup still
-- checks that the entry exists, is in this chain and month and above the head; only a
-- pointer is taken from the setting, never a hash (0009's reasoning holds unchanged).
--
-- Expand only: the function is the database's, shared by every release; no code names
-- the setting. A setting in 0009's two-part form (written by the old body earlier in a
-- statement that straddles this migration, which a statement cannot) is ignored, and
-- the entry continues from the head: at worst two entries share a link, which `audit
-- verify` names.

CREATE OR REPLACE FUNCTION audit_log_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
-- Seq scans off for this function's statements: they are all probes by key.
SET enable_seqscan = off AS $$
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
    IF array_length(hint, 1) = 3 AND hint[1] ~ '^-?[0-9]{1,18}$' AND hint[2] ~ '^[0-9]{1,18}$'
       AND hint[3] ~ '^[0-9]{1,18}$'
    THEN
        -- Every column of both indexes that could answer is pinned: whichever the
        -- planner takes (the primary key or audit_log_chain), it is one probe.
        SELECT a.chain_seq, a.chain_hash INTO prev
        FROM audit_log a
        WHERE a.at = to_timestamp(0) + hint[1]::bigint * interval '1 microsecond'
          AND a.id = hint[2]::bigint
          AND a.chain_stripe = head.stripe
          AND a.chain_seq = hint[3]::bigint;
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
        (extract(epoch FROM NEW.at) * 1000000)::bigint || '/' || NEW.id || '/' || NEW.chain_seq,
        true);
    RETURN NEW;
END
$$;
