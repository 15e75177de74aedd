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
