-- unattached_partition_indexes --
-- Partitions still lacking their share of an index created ON ONLY their table: the
-- name that share gets (the partition's name, then the index's without the table's),
-- whether an index of that name exists already and is valid, and the index's method
-- and columns as pg_get_indexdef writes them after "USING".
SELECT parent.relname AS parent_index,
       part.relname AS partition,
       c.child,
       (SELECT ci.indisvalid FROM pg_index ci
        WHERE ci.indexrelid = to_regclass(quote_ident(c.child))) AS child_valid,
       substring(pg_get_indexdef(pi.indexrelid) FROM ' USING .*$') AS using_clause
FROM pg_index pi
JOIN pg_class parent ON parent.oid = pi.indexrelid AND parent.relkind = 'I'
JOIN pg_class tbl ON tbl.oid = pi.indrelid
JOIN pg_inherits inh ON inh.inhparent = tbl.oid
JOIN pg_class part ON part.oid = inh.inhrelid
CROSS JOIN LATERAL (
    SELECT left(part.relname || '_' || CASE
               WHEN starts_with(parent.relname, tbl.relname || '_')
               THEN substr(parent.relname, length(tbl.relname) + 2)
               ELSE parent.relname END, 63) AS child
) c
WHERE tbl.relnamespace = 'public'::regnamespace
  AND NOT pi.indisvalid
  AND NOT EXISTS (
      SELECT 1 FROM pg_inherits ii JOIN pg_index ci ON ci.indexrelid = ii.inhrelid
      WHERE ii.inhparent = pi.indexrelid AND ci.indrelid = part.oid)
ORDER BY 1, 2

-- index_valid --
-- Whether the index of that name is valid; no row: there is none. An invalid one
-- is what a CREATE INDEX CONCURRENTLY that failed or was interrupted leaves.
SELECT i.indisvalid AS valid
FROM pg_index i
WHERE i.indexrelid = to_regclass(quote_ident(%(name)s))

-- unique_index_parts --
-- A unique index's definition, in the catalog's words, to find the rows that break
-- it and to build it again without them: its table, its key, its predicate, its
-- definition without the predicate, and its table's primary key when that is one
-- column (NULL otherwise).
SELECT i.indrelid::regclass::text AS table_name,
       (SELECT string_agg(pg_get_indexdef(i.indexrelid, k, false), ', ' ORDER BY k)
        FROM generate_series(1, i.indnkeyatts) k) AS key,
       pg_get_expr(i.indpred, i.indrelid) AS predicate,
       left(d.def, length(d.def)
                   - coalesce(length(' WHERE ' || pg_get_expr(i.indpred, i.indrelid)), 0))
           AS definition,
       (SELECT quote_ident(a.attname)
        FROM pg_index pk
        JOIN pg_attribute a ON a.attrelid = pk.indrelid AND a.attnum = pk.indkey[0]
        WHERE pk.indrelid = i.indrelid AND pk.indisprimary AND pk.indnkeyatts = 1)
           AS primary_key
FROM pg_index i
CROSS JOIN LATERAL (SELECT pg_get_indexdef(i.indexrelid) AS def) d
WHERE i.indexrelid = to_regclass(quote_ident(%(name)s)) AND i.indisunique

-- blockers --
-- The sessions a backend waits for (a CONCURRENTLY build waits for every transaction
-- older than its snapshots, in any session of the database), as an operator would
-- look them up: pid, who, from where, what state, its transaction's age, and its last
-- statement's start. Without pg_read_all_stats another role's state and query read NULL.
SELECT a.pid, a.usename AS "user", a.application_name, a.client_addr::text AS client,
       coalesce(a.state, 'state hidden') AS state,
       date_trunc('second', now() - a.xact_start)::text AS age,
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 80) AS query
FROM pg_stat_activity a
WHERE a.pid = ANY (pg_blocking_pids(%(pid)s))
ORDER BY a.pid

-- lock_holder --
-- The session holding the migration lock (a bigint advisory lock: classid its high 32
-- bits, objid its low ones), as blockers names a session (age: since it connected);
-- no row: none now.
SELECT a.pid, a.usename AS "user", a.application_name, a.client_addr::text AS client,
       coalesce(a.state, 'state hidden') AS state,
       date_trunc('second', now() - a.backend_start)::text AS age,
       left(regexp_replace(a.query, '\s+', ' ', 'g'), 80) AS query
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = (%(key)s::bigint >> 32)
  AND l.objid::bigint = (%(key)s::bigint & 4294967295)
