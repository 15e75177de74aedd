-- insert --
-- One audit entry; written in the transaction of the change it describes.
INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details)
VALUES (%(actor_type)s, %(actor_id)s, %(park_id)s, %(action)s, %(outcome)s, %(request_id)s,
        %(payout_id)s, %(details)s)
RETURNING id, at

-- list_page --
-- Newest first, keyset pagination on (at, id); every filter optional.
SELECT * FROM audit_log
WHERE (%(park_id)s::text IS NULL OR park_id = %(park_id)s)
  AND (%(actor_id)s::text IS NULL OR actor_id = %(actor_id)s)
  AND (%(action)s::text IS NULL OR action = %(action)s)
  AND (%(since)s::timestamptz IS NULL OR at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR at < %(until)s)
  AND (%(after_at)s::timestamptz IS NULL OR (at, id) < (%(after_at)s::timestamptz, %(after_id)s::bigint))
ORDER BY at DESC, id DESC
LIMIT %(limit)s

-- months_ahead --
-- How many monthly partitions exist beyond the current month.
SELECT audit_log_months_ahead() AS months
