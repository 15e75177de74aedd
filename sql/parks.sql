-- upsert --
-- Register a park or update the given fields; (xmax = 0) tells a fresh insert.
-- The hold changes only when given: a reason puts the park on hold (keeping
-- the time it started if it already was), NULL releases it.
-- The fee and the end date, likewise, change only when given (NULL clears them).
INSERT INTO parks (park_id, instant_payouts_enabled, periodic_payouts_enabled, params,
                   hold_reason, hold_since, hold_by, instant_fee_percent, instant_fee_fixed,
                   instant_payouts_until)
VALUES (%(park_id)s, coalesce(%(instant)s, false), coalesce(%(periodic)s, true),
        coalesce(%(params)s, '{}'::jsonb), %(hold_reason)s,
        CASE WHEN %(hold_reason)s::text IS NOT NULL THEN now() END,
        CASE WHEN %(hold_reason)s::text IS NOT NULL THEN %(hold_by)s END,
        %(fee_percent)s, %(fee_fixed)s, %(until)s)
ON CONFLICT (park_id) DO UPDATE SET
    instant_fee_percent = CASE WHEN %(fee_given)s THEN excluded.instant_fee_percent
                               ELSE parks.instant_fee_percent END,
    instant_fee_fixed = CASE WHEN %(fee_given)s THEN excluded.instant_fee_fixed
                             ELSE parks.instant_fee_fixed END,
    instant_payouts_until = CASE WHEN %(until_given)s THEN excluded.instant_payouts_until
                                 ELSE parks.instant_payouts_until END,
    instant_payouts_enabled = coalesce(%(instant)s, parks.instant_payouts_enabled),
    periodic_payouts_enabled = coalesce(%(periodic)s, parks.periodic_payouts_enabled),
    params = coalesce(%(params)s, parks.params),
    hold_reason = CASE WHEN %(hold_given)s THEN excluded.hold_reason ELSE parks.hold_reason END,
    hold_since = CASE WHEN NOT %(hold_given)s THEN parks.hold_since
                      WHEN excluded.hold_reason IS NULL THEN NULL
                      ELSE coalesce(parks.hold_since, now()) END,
    hold_by = CASE WHEN %(hold_given)s THEN excluded.hold_by ELSE parks.hold_by END,
    updated_at = now()
RETURNING *, (xmax = 0) AS created

-- get --
-- One park.
SELECT * FROM parks WHERE park_id = %(park_id)s

-- lock --
-- Lock the park row: every decision about one park's payouts is serialised here.
SELECT * FROM parks WHERE park_id = %(park_id)s FOR UPDATE

-- mark_paid --
-- A payout succeeded: the periodic clock restarts from now.
UPDATE parks SET last_payout_at = greatest(last_payout_at, %(at)s) WHERE park_id = %(park_id)s

-- import_stage --
-- The import's staging table, gone at commit; n is the row's line in the file.
-- The fee and the end date: NULL leaves them, the *_clear flags remove them.
CREATE TEMPORARY TABLE parks_import (
    n bigint, park_id text, instant boolean, periodic boolean, hold text,
    fee_percent numeric, fee_fixed numeric, fee_clear boolean,
    until timestamptz, until_clear boolean
) ON COMMIT DROP

-- import_copy --
-- Rows of the CSV file, streamed in.
COPY parks_import (n, park_id, instant, periodic, hold, fee_percent, fee_fixed, fee_clear, until,
                   until_clear) FROM STDIN

-- import_dedupe --
-- Duplicates in the file: the last line for a park wins. One hash aggregate and
-- one hash join: linear (a self-join on ctid was a nested loop, quadratic).
DELETE FROM parks_import i
USING (SELECT park_id, max(n) AS last FROM parks_import GROUP BY park_id HAVING count(*) > 1) d
WHERE i.park_id = d.park_id AND i.n < d.last

-- import_index --
-- The batches below read the staged rows by line range; the planner gets real counts.
CREATE INDEX ON parks_import (n);
ANALYZE parks_import

-- import_update --
-- One batch (lines after..upto) of parks whose flags or hold really change (an empty cell leaves the current
-- value; '-' in hold_reason releases it), each with an audit entry naming
-- what changed: a park's history shows its imports like any other admin change.
WITH before AS (
    SELECT p.park_id, p.instant_payouts_enabled AS instant, p.periodic_payouts_enabled AS periodic,
           p.hold_reason AS hold,
           coalesce(i.instant, p.instant_payouts_enabled) AS new_instant,
           coalesce(i.periodic, p.periodic_payouts_enabled) AS new_periodic,
           CASE WHEN i.hold IS NULL THEN p.hold_reason
                WHEN i.hold = %(release)s THEN NULL
                ELSE i.hold END AS new_hold,
           p.instant_fee_percent AS fee_percent, p.instant_fee_fixed AS fee_fixed,
           CASE WHEN i.fee_clear THEN NULL
                ELSE coalesce(i.fee_percent, p.instant_fee_percent) END AS new_fee_percent,
           CASE WHEN i.fee_clear THEN NULL
                ELSE coalesce(i.fee_fixed, p.instant_fee_fixed) END AS new_fee_fixed,
           p.instant_payouts_until AS until,
           CASE WHEN i.until_clear THEN NULL
                ELSE coalesce(i.until, p.instant_payouts_until) END AS new_until
    FROM parks p JOIN parks_import i USING (park_id)
    WHERE i.n > %(after)s AND i.n <= %(upto)s
    FOR UPDATE OF p
), changes AS (
    SELECT *,
           CASE WHEN new_instant IS DISTINCT FROM instant
                THEN jsonb_build_object('instant_payouts_enabled', new_instant) ELSE '{}' END
           || CASE WHEN new_periodic IS DISTINCT FROM periodic
                   THEN jsonb_build_object('periodic_payouts_enabled', new_periodic) ELSE '{}' END
           || CASE WHEN new_hold IS DISTINCT FROM hold
                   THEN jsonb_build_object('hold', CASE WHEN new_hold IS NULL THEN NULL
                                                   ELSE jsonb_build_object('reason', new_hold) END)
                   ELSE '{}' END
           || CASE WHEN (new_fee_percent, new_fee_fixed) IS DISTINCT FROM (fee_percent, fee_fixed)
                   THEN jsonb_build_object('instant_fee', CASE WHEN new_fee_percent IS NULL THEN NULL
                        ELSE jsonb_build_object('percent', to_char(new_fee_percent, 'FM990.00'),
                                                'fixed', new_fee_fixed::numeric(18, 2)::text) END)
                   ELSE '{}' END
           || CASE WHEN new_until IS DISTINCT FROM until
                   THEN jsonb_build_object('instant_payouts_until', new_until)
                   ELSE '{}' END AS diff
    FROM before
), changed AS (
    UPDATE parks p
    SET instant_payouts_enabled = c.new_instant, periodic_payouts_enabled = c.new_periodic,
        hold_reason = c.new_hold,
        instant_fee_percent = c.new_fee_percent, instant_fee_fixed = c.new_fee_fixed,
        instant_payouts_until = c.new_until,
        hold_since = CASE WHEN c.new_hold IS NULL THEN NULL
                          WHEN c.hold IS NULL THEN now() ELSE p.hold_since END,
        hold_by = CASE WHEN c.new_hold IS NULL THEN NULL
                       WHEN c.new_hold IS DISTINCT FROM c.hold THEN %(actor_id)s
                       ELSE p.hold_by END,
        updated_at = now()
    FROM changes c
    WHERE p.park_id = c.park_id AND c.diff <> '{}'
    RETURNING p.park_id
)
INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, details)
SELECT 'admin', %(actor_id)s, c.park_id, 'park.update', 'ok',
       jsonb_build_object('source', 'import', 'file', %(file)s::text, 'changes', c.diff)
FROM changes c JOIN changed USING (park_id)

-- import_insert --
-- One batch (lines after..upto) of the parks the registry did not know, each with its
-- audit entry.
WITH created AS (
    INSERT INTO parks (park_id, instant_payouts_enabled, periodic_payouts_enabled,
                       hold_reason, hold_since, hold_by, instant_fee_percent, instant_fee_fixed,
                       instant_payouts_until)
    SELECT park_id, coalesce(instant, false), coalesce(periodic, true), nullif(hold, %(release)s),
           CASE WHEN nullif(hold, %(release)s) IS NOT NULL THEN now() END,
           CASE WHEN nullif(hold, %(release)s) IS NOT NULL THEN %(actor_id)s END,
           fee_percent, fee_fixed, until
    FROM parks_import
    WHERE n > %(after)s AND n <= %(upto)s
    ON CONFLICT (park_id) DO NOTHING
    RETURNING park_id, instant_payouts_enabled, periodic_payouts_enabled, hold_reason,
              instant_fee_percent, instant_fee_fixed, instant_payouts_until
)
INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, details)
SELECT 'admin', %(actor_id)s, park_id, 'park.register', 'ok',
       jsonb_build_object('source', 'import', 'file', %(file)s::text, 'changes', jsonb_build_object(
           'instant_payouts_enabled', instant_payouts_enabled,
           'periodic_payouts_enabled', periodic_payouts_enabled)
           || CASE WHEN hold_reason IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('hold', jsonb_build_object('reason', hold_reason)) END
           || CASE WHEN instant_fee_percent IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('instant_fee', jsonb_build_object(
                        'percent', to_char(instant_fee_percent, 'FM990.00'),
                        'fixed', instant_fee_fixed::text)) END
           || CASE WHEN instant_payouts_until IS NULL THEN '{}'::jsonb
                   ELSE jsonb_build_object('instant_payouts_until', instant_payouts_until) END)
FROM created
