-- Decided under the park's lock (SPEC section 2; issue 15, break 2): a hold
-- or a switch-off that committed first always wins over a payout created
-- after it. Each path's own SQL (press, scan, follow-up) checks the park's
-- switches and hold under its row lock; this is the database's word for any
-- path that forgets, today's or a later one.
--
-- When a payout enters flight (inserted pending, or later moved into pending
-- from a status that is not in flight), its park's row is locked -- waiting
-- for any transaction changing it, then reading the row it committed -- and
-- the payout is refused if the park is on hold or has that kind switched off.
-- Inserts are checked once per statement (the periodic scan inserts 1,000 at
-- a time), in park order. Expand only: the previous code's paths all pass it
-- (its follow-up, which did not lock, now waits and is refused, and its job
-- retries and finds the park off schedule).

-- The rule, once: a payout of this kind may not enter flight for such a park.
-- (A plain SQL function: inlined into the queries below, no call per row.)
CREATE FUNCTION payouts_park_forbids(kind text, park parks) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT park.hold_reason IS NOT NULL
        OR (kind = 'instant' AND NOT park.instant_payouts_enabled)
        OR (kind = 'periodic' AND NOT park.periodic_payouts_enabled)
$$;

CREATE FUNCTION payouts_refuse_off_park_lock(payout_id uuid, kind text, park_id text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payout % (%) for park %: the park is on hold or its % payouts are off',
                    payout_id, kind, park_id, kind
        USING ERRCODE = 'check_violation', CONSTRAINT = 'payouts_decided_under_park_lock',
              HINT = 'lock the park row and check its hold and switches in the transaction that creates the payout';
END
$$;

CREATE FUNCTION payouts_created_under_park_lock() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    -- The inner query locks every park first (a row that changed meanwhile is
    -- read again as committed); only then does the outer one judge it. OFFSET 0
    -- keeps the planner from pushing the judgement below the lock, where it
    -- would read the old row and skip locking the ones it finds fine.
    SELECT x.id, x.kind, x.park_id INTO bad
    FROM (SELECT c.id, c.kind, k.park_id, k AS park
          FROM created c JOIN parks k ON k.park_id = c.park_id
          WHERE c.status IN ('pending', 'processing')
          ORDER BY k.park_id
          FOR NO KEY UPDATE OF k
          OFFSET 0) x
    WHERE payouts_park_forbids(x.kind, x.park)
    LIMIT 1;
    IF FOUND THEN
        PERFORM payouts_refuse_off_park_lock(bad.id, bad.kind, bad.park_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER payouts_created_under_park_lock
    AFTER INSERT ON payouts
    REFERENCING NEW TABLE AS created
    FOR EACH STATEMENT EXECUTE FUNCTION payouts_created_under_park_lock();

CREATE FUNCTION payouts_enter_flight_under_park_lock() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    park parks;
BEGIN
    SELECT * INTO park FROM parks WHERE park_id = NEW.park_id FOR NO KEY UPDATE;
    IF payouts_park_forbids(NEW.kind, park) THEN
        PERFORM payouts_refuse_off_park_lock(NEW.id, NEW.kind, NEW.park_id);
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER payouts_enter_flight_under_park_lock
    BEFORE UPDATE OF status ON payouts
    FOR EACH ROW
    WHEN (OLD.status NOT IN ('pending', 'processing') AND NEW.status IN ('pending', 'processing'))
    EXECUTE FUNCTION payouts_enter_flight_under_park_lock();
