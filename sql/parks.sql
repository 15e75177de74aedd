-- upsert --
-- Register a park or update the given fields; (xmax = 0) tells a fresh insert.
INSERT INTO parks (park_id, instant_payouts_enabled, periodic_payouts_enabled, params)
VALUES (%(park_id)s, coalesce(%(instant)s, false), coalesce(%(periodic)s, true),
        coalesce(%(params)s, '{}'::jsonb))
ON CONFLICT (park_id) DO UPDATE SET
    instant_payouts_enabled = coalesce(%(instant)s, parks.instant_payouts_enabled),
    periodic_payouts_enabled = coalesce(%(periodic)s, parks.periodic_payouts_enabled),
    params = coalesce(%(params)s, parks.params),
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
