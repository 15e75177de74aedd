-- Schema v15: the gauges every process refreshes every 15 s read a bounded amount,
-- whatever the history (issue 21, "Years of history"; measured by tests/bench/history.py).
--
-- * Jobs by status: counted as they change, by statement-level triggers on
--   procrastinate_jobs, instead of count(*) over the queue table (0.6-0.85 s at 5 M
--   jobs whenever housekeeping falls behind). The gauge sums a few rows.
-- * Distinct parks with a succeeded instant payout per window: each park's latest
--   success kept in a row of its own as it happens, instead of a distinct count over
--   30 days of instant payouts (114-248 ms at the seed's scale). The gauge counts parks
--   (bounded by the fleet), not payouts.
-- * Housekeeping deletes finished jobs in short batches through the primary key; the
--   failed, cancelled and aborted ones (kept longer) through a partial index of their own.
--
-- Expand only (rolling deploy): the previous code's count(*) queries keep working.

-- --- jobs by status ----------------------------------------------------------------

-- Per status, one row per stripe: a transaction adds its change to the stripe of its
-- backend, so concurrent workers seldom wait on one another's row. A stripe's count may
-- go below zero (a job deferred by one backend, fetched by another); the sum never does.
CREATE TABLE job_status_counts (
    status procrastinate_job_status NOT NULL,
    stripe smallint NOT NULL CHECK (stripe >= 0),
    n      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (status, stripe)
);

CREATE FUNCTION job_status_stripe() RETURNS smallint LANGUAGE sql VOLATILE AS $$
    SELECT (pg_backend_pid() % 64)::smallint
$$;

-- SECURITY DEFINER: whoever changes a job (the app, ops deleting a failed one) changes
-- its count, and no role but the owner may write the counts otherwise. Rows are locked in
-- status order: two statements never wait on each other's rows crosswise.
CREATE FUNCTION job_status_counts_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO job_status_counts AS c (status, stripe, n)
    SELECT status, job_status_stripe(), count(*) FROM added GROUP BY status ORDER BY status
    ON CONFLICT (status, stripe) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END
$$;

CREATE FUNCTION job_status_counts_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO job_status_counts AS c (status, stripe, n)
    SELECT status, job_status_stripe(), sum(d)
    FROM (SELECT status, 1 AS d FROM after_rows
          UNION ALL SELECT status, -1 FROM before_rows) x
    GROUP BY status HAVING sum(d) <> 0 ORDER BY status
    ON CONFLICT (status, stripe) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END
$$;

CREATE FUNCTION job_status_counts_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    INSERT INTO job_status_counts AS c (status, stripe, n)
    SELECT status, job_status_stripe(), -count(*) FROM removed GROUP BY status ORDER BY status
    ON CONFLICT (status, stripe) DO UPDATE SET n = c.n + excluded.n;
    RETURN NULL;
END
$$;

CREATE FUNCTION job_status_counts_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
BEGIN
    DELETE FROM job_status_counts;
    RETURN NULL;
END
$$;

-- Writes to the queue wait from here to this migration's commit: the counts start exact.
LOCK TABLE procrastinate_jobs IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER job_status_counts_insert AFTER INSERT ON procrastinate_jobs
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION job_status_counts_insert();
CREATE TRIGGER job_status_counts_update AFTER UPDATE ON procrastinate_jobs
    REFERENCING OLD TABLE AS before_rows NEW TABLE AS after_rows
    FOR EACH STATEMENT EXECUTE FUNCTION job_status_counts_update();
CREATE TRIGGER job_status_counts_delete AFTER DELETE ON procrastinate_jobs
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION job_status_counts_delete();
CREATE TRIGGER job_status_counts_truncate AFTER TRUNCATE ON procrastinate_jobs
    FOR EACH STATEMENT EXECUTE FUNCTION job_status_counts_truncate();

INSERT INTO job_status_counts (status, stripe, n)
SELECT status, 0, count(*) FROM procrastinate_jobs GROUP BY status;

-- Housekeeping's failed, cancelled and aborted jobs, oldest first (few rows: the
-- succeeded ones are found through the primary key, at the head of the queue table).
CREATE INDEX job_finished_unsuccessfully ON procrastinate_jobs (id)
    WHERE status IN ('failed', 'cancelled', 'aborted');


-- --- parks with a succeeded instant payout ----------------------------------------------

-- Each park's latest succeeded instant payout, kept as payouts succeed (and as a
-- returned one stops counting, as it stopped counting for the query this replaces).
CREATE TABLE instant_payout_parks (
    park_id           text PRIMARY KEY,
    last_succeeded_at timestamptz NOT NULL
);
CREATE INDEX instant_payout_parks_last ON instant_payout_parks (last_succeeded_at);

-- How many parks have their latest success in each hour (UTC), in a few stripes so that
-- successes finishing at once seldom wait on one row. A window's count is its whole
-- hours' sums plus the parks of the hour it starts in, counted one by one: a few hundred
-- rows whatever the fleet and the history.
CREATE TABLE instant_payout_park_hours (
    hour   timestamptz NOT NULL,
    stripe smallint NOT NULL CHECK (stripe >= 0),
    n      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, stripe)
);

CREATE FUNCTION instant_payout_parks_note() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public AS $$
DECLARE
    before_at timestamptz;
    after_at  timestamptz;
BEGIN
    -- One park at a time (its first success has no row to lock yet).
    PERFORM pg_advisory_xact_lock(hashtext('instant_payout_parks'), hashtext(NEW.park_id));
    SELECT k.last_succeeded_at INTO before_at FROM instant_payout_parks k
    WHERE k.park_id = NEW.park_id;
    IF NEW.status = 'succeeded' THEN
        after_at := greatest(before_at, NEW.completed_at);
    ELSE
        -- No longer succeeded (returned): the park's latest success is another one, or
        -- none. One park's payouts (payouts_park_created).
        SELECT max(p.completed_at) INTO after_at FROM payouts p
        WHERE p.park_id = NEW.park_id AND p.kind = 'instant' AND p.status = 'succeeded';
    END IF;
    IF after_at IS NOT DISTINCT FROM before_at THEN
        RETURN NULL;
    END IF;
    IF after_at IS NULL THEN
        DELETE FROM instant_payout_parks WHERE park_id = NEW.park_id;
    ELSE
        INSERT INTO instant_payout_parks AS k (park_id, last_succeeded_at)
        VALUES (NEW.park_id, after_at)
        ON CONFLICT (park_id) DO UPDATE SET last_succeeded_at = excluded.last_succeeded_at;
    END IF;
    -- The park moves from the hour of its previous latest success to its new one's.
    INSERT INTO instant_payout_park_hours AS h (hour, stripe, n)
    SELECT date_trunc('hour', t.at, 'UTC'), (pg_backend_pid() % 4)::smallint, sum(t.d)
    FROM (VALUES (before_at, -1), (after_at, 1)) AS t(at, d)
    WHERE t.at IS NOT NULL
    GROUP BY 1 HAVING sum(t.d) <> 0 ORDER BY 1
    ON CONFLICT (hour, stripe) DO UPDATE SET n = h.n + excluded.n;
    RETURN NULL;
END
$$;

-- The count of one window (the gauge's 1, 7 and 30 days), exact: its whole hours' sums,
-- and the parks of the hour it starts in one by one.
CREATE FUNCTION instant_payout_parks_since(since timestamptz) RETURNS bigint
LANGUAGE sql STABLE SET search_path = pg_catalog, public AS $$
    SELECT (SELECT coalesce(sum(h.n), 0) FROM instant_payout_park_hours h
            WHERE h.hour >= date_trunc('hour', since, 'UTC') + interval '1 hour')
         + (SELECT count(*) FROM instant_payout_parks k
            WHERE k.last_succeeded_at > since
              AND k.last_succeeded_at < date_trunc('hour', since, 'UTC') + interval '1 hour')
$$;

-- Payout writes wait from here to this migration's commit: no success is missed.
LOCK TABLE payouts IN SHARE ROW EXCLUSIVE MODE;

CREATE TRIGGER instant_payout_parks_note AFTER UPDATE OF status ON payouts
    FOR EACH ROW WHEN (NEW.kind = 'instant' AND OLD.status IS DISTINCT FROM NEW.status
                       AND 'succeeded' IN (OLD.status, NEW.status))
    EXECUTE FUNCTION instant_payout_parks_note();

-- The gauge's longest window is 30 days: older successes cannot count again.
INSERT INTO instant_payout_parks (park_id, last_succeeded_at)
SELECT park_id, max(completed_at) FROM payouts
WHERE kind = 'instant' AND status = 'succeeded' AND completed_at > now() - interval '30 days'
GROUP BY park_id;
INSERT INTO instant_payout_park_hours (hour, stripe, n)
SELECT date_trunc('hour', last_succeeded_at, 'UTC'), 0, count(*) FROM instant_payout_parks
GROUP BY 1;
