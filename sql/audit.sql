-- insert --
-- One audit entry; written in the transaction of the change it describes.
INSERT INTO audit_log (actor_type, actor_id, park_id, action, outcome, request_id, payout_id, details)
VALUES (%(actor_type)s, %(actor_id)s, %(park_id)s, %(action)s, %(outcome)s, %(request_id)s,
        %(payout_id)s, %(details)s)
RETURNING id, at

-- months_ahead --
-- How many monthly partitions exist beyond the current month.
SELECT audit_log_months_ahead() AS months
