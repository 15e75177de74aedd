-- insert --
-- One audit entry; written in the transaction of the change it describes.
INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details)
VALUES (%(actor_type)s, %(actor_id)s, %(park_id)s, %(action)s, %(outcome)s, %(request_id)s,
        %(payout_id)s, %(details)s)
RETURNING id, at

-- months_ahead --
-- How many monthly partitions exist beyond the current month.
SELECT audit_log_months_ahead() AS months

-- ensure_partitions --
-- Monthly partitions up to `months_ahead` ahead (the owner's SECURITY DEFINER function).
SELECT audit_log_ensure_partitions(%(months_ahead)s) AS created

-- missing_partitions --
-- How many months, from the current one to `months_ahead` ahead, have no partition yet.
SELECT count(*)::integer AS missing
FROM generate_series(0, %(months_ahead)s) AS i
WHERE to_regclass('audit_log_' || to_char(
          date_trunc('month', now() AT TIME ZONE 'UTC') + make_interval(months => i),
          'YYYY_MM')) IS NULL

-- chain_span --
-- The first and last month `audit verify` has to look at: wherever there are entries,
-- chain heads that count some, or archive records.
SELECT least(
           (SELECT min(month) FROM audit_chain_heads WHERE last_seq > 0),
           (SELECT min(month) FROM audit_archive),
           (SELECT date_trunc('month', min(at) AT TIME ZONE 'UTC')::date FROM audit_log),
           (SELECT min(month) FROM audit_verified_months)
       ) AS first,
       greatest(
           (SELECT max(month) FROM audit_chain_heads WHERE last_seq > 0),
           (SELECT max(month) FROM audit_archive),
           (SELECT date_trunc('month', max(at) AT TIME ZONE 'UTC')::date FROM audit_log)
       ) AS last,
       (SELECT max_id FROM audit_chain_legacy) AS legacy_max_id,
       date_trunc('month', now() AT TIME ZONE 'UTC')::date AS current,
       has_table_privilege('audit_verified_months', 'INSERT') AS may_record

-- chain_heads --
-- The last link of every chain of one month that has any.
SELECT stripe, last_seq, last_hash, first_id, last_id
FROM audit_chain_heads
WHERE month = %(month)s AND last_seq > 0
ORDER BY stripe

-- chain_archive --
-- The archive record of one month, if a DBA archived it.
SELECT month, entries, month_digest, location, export_sha256
FROM audit_archive
WHERE month = %(month)s

-- chain_entries --
-- One month's entries as `audit verify` reads them: chain by chain, link by link,
-- entries without a link (older than the chain, or written with its trigger off) last.
SELECT id, at, actor_type, actor_id, park_id, action, outcome, request_id, payout_id,
       details::text AS details, chain_stripe, chain_seq, chain_hash
FROM audit_log
WHERE at >= %(start)s AND at < %(end)s
ORDER BY chain_stripe, chain_seq

-- partition_bounds --
-- The range each partition of audit_log holds: [low, high). (Bounds text carries its
-- UTC offset, so the session's TimeZone does not matter.)
SELECT b.bound[1]::timestamptz AS low, b.bound[2]::timestamptz AS high
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (
    SELECT regexp_match(pg_get_expr(c.relpartbound, c.oid),
                        'FROM \(''([^'']+)''\) TO \(''([^'']+)''\)') AS bound
) b
WHERE i.inhparent = 'audit_log'::regclass AND b.bound IS NOT NULL

-- archived_months --
-- Every month a DBA archived.
SELECT month FROM audit_archive

-- verified_months --
-- The newest record `audit verify` left for each closed month it walked.
SELECT DISTINCT ON (month) month, entries, legacy, month_digest, verified_at
FROM audit_verified_months
ORDER BY month, id DESC

-- record_verified --
-- A closed month walked intact, with the digest its chain heads had.
INSERT INTO audit_verified_months (month, entries, legacy, month_digest)
VALUES (%(month)s, %(entries)s, %(legacy)s, %(digest)s)
