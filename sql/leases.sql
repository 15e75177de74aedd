-- take --
-- Hold (or renew) lease %(name)s until now + ttl, by the database's clock.
-- No row: someone else holds it and it has not expired.
INSERT INTO scan_leases (name, holder, expires_at)
VALUES (%(name)s, %(holder)s, statement_timestamp() + %(ttl)s)
ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
WHERE scan_leases.holder = excluded.holder OR scan_leases.expires_at < statement_timestamp()
RETURNING holder

-- release --
-- Let the next holder start at once.
DELETE FROM scan_leases WHERE name = %(name)s AND holder = %(holder)s
