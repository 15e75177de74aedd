-- record --
-- One run's verdict, stamped by the database's clock.
UPDATE ops_checks
SET last_run_at = now(), last_ok = %(ok)s,
    last_ok_at = CASE WHEN %(ok)s THEN now() ELSE last_ok_at END,
    last_detail = left(%(detail)s, 2000)
WHERE check_name = %(check)s

-- all --
-- Every check's state, as the gauges export it (Unix times; 0: never).
SELECT check_name,
       extract(epoch FROM expected_since)::float8 AS expected_since,
       coalesce(extract(epoch FROM last_run_at)::float8, 0) AS last_run,
       last_ok
FROM ops_checks
