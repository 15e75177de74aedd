-- whoami --
-- Who migrate runs as, what it may do with roles, and which of ours exist.
SELECT current_user AS name,
       r.rolsuper AS superuser,
       r.rolcreaterole AS createrole,
       to_regrole(%(owner)s) IS NOT NULL AS owner_exists,
       to_regrole(%(app)s) IS NOT NULL AS app_exists,
       to_regrole(%(readonly)s) IS NOT NULL AS readonly_exists,
       to_regrole(%(ops)s) IS NOT NULL AS ops_exists,
       to_regrole(%(owner)s) IS NOT NULL AND pg_has_role(current_user, %(owner)s::name, 'MEMBER')
           AS acts_as_owner,
       to_regrole(%(owner)s) IS NOT NULL AND to_regrole(%(app)s) IS NOT NULL
           AND pg_has_role(%(app)s::name, %(owner)s::name, 'MEMBER') AS app_acts_as_owner,
       pg_has_role(current_user, n.nspowner, 'USAGE') AS owns_schema
FROM pg_roles r, pg_namespace n
WHERE r.rolname = current_user AND n.nspname = 'public'

-- schema_privileges --
-- What one role may do in the schema and the database.
SELECT has_schema_privilege(%(role)s::name, 'public', 'USAGE') AS usage,
       has_schema_privilege(%(role)s::name, 'public', 'CREATE') AS create,
       has_database_privilege(%(role)s::name, current_database(), 'CREATE') AS create_schema

-- foreign_owned --
-- Objects of the schema (ours and procrastinate's) that another role owns, as the
-- statements that hand them to the owner. Indexes, identity sequences and a table's
-- row type follow their table; extension members stay with the extension.
SELECT format('ALTER %%s %%s OWNER TO %%I', o.kind, o.ident, %(owner)s::text) AS statement
FROM (
    SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW'
                          WHEN 'm' THEN 'MATERIALIZED VIEW' WHEN 'f' THEN 'FOREIGN TABLE'
                          WHEN 'c' THEN 'TYPE' ELSE 'TABLE' END AS kind,
           c.oid::regclass::text AS ident, c.relowner AS owner,
           'pg_class'::regclass AS classid, c.oid
    FROM pg_class c
    WHERE c.relnamespace = 'public'::regnamespace
      AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f', 'c')
      AND NOT (c.relkind = 'S' AND EXISTS (
          SELECT 1 FROM pg_depend d
          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i')))
    UNION ALL
    SELECT CASE p.prokind WHEN 'p' THEN 'PROCEDURE' WHEN 'a' THEN 'AGGREGATE' ELSE 'FUNCTION' END,
           p.oid::regprocedure::text, p.proowner, 'pg_proc'::regclass, p.oid
    FROM pg_proc p
    WHERE p.pronamespace = 'public'::regnamespace
    UNION ALL
    SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END,
           t.oid::regtype::text, t.typowner, 'pg_type'::regclass, t.oid
    FROM pg_type t
    WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd', 'r')
) o
WHERE o.owner <> to_regrole(%(owner)s)
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = o.classid AND d.objid = o.oid AND d.deptype = 'e')
ORDER BY o.kind, o.ident

-- relations --
-- Every table, partition, view and sequence of the schema with the privileges the
-- app, ops and readonly roles and PUBLIC hold on it now (explicit grants only), the
-- column-level ones as 'role:PRIVILEGE:column', its columns, and for a sequence the
-- table that owns it.
SELECT c.oid::regclass::text AS name,
       c.relname,
       c.relkind,
       c.relispartition AS partition,
       pg_has_role(current_user, c.relowner, 'USAGE') AS ours,
       array(SELECT a.privilege_type FROM aclexplode(c.relacl) a
             WHERE a.grantee = to_regrole(%(app)s)) AS app,
       array(SELECT a.privilege_type FROM aclexplode(c.relacl) a
             WHERE a.grantee = to_regrole(%(ops)s)) AS ops,
       array(SELECT a.privilege_type FROM aclexplode(c.relacl) a
             WHERE a.grantee = to_regrole(%(readonly)s)) AS readonly,
       array(SELECT a.privilege_type FROM aclexplode(c.relacl) a
             WHERE a.grantee = 0) AS public,
       array(SELECT att.attname::text FROM pg_attribute att
             WHERE att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped
             ORDER BY att.attnum) AS columns,
       array(SELECT CASE a.grantee WHEN to_regrole(%(app)s) THEN 'app'
                                   WHEN to_regrole(%(ops)s) THEN 'ops'
                                   WHEN to_regrole(%(readonly)s) THEN 'readonly'
                                   ELSE 'public' END
                    || ':' || a.privilege_type || ':' || att.attname
             FROM pg_attribute att, aclexplode(att.attacl) a
             WHERE att.attrelid = c.oid AND att.attnum > 0 AND NOT att.attisdropped
               AND (a.grantee = 0 OR a.grantee IN (to_regrole(%(app)s), to_regrole(%(ops)s),
                                                   to_regrole(%(readonly)s)))
             ORDER BY 1) AS column_privileges,
       (SELECT t.relname FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
          AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
        LIMIT 1) AS sequence_of
FROM pg_class c
WHERE c.relnamespace = 'public'::regnamespace
  AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 1

-- functions --
-- Every function of the schema: SECURITY DEFINER or not, and who may execute it.
SELECT p.oid::regprocedure::text AS signature,
       p.proname,
       p.prosecdef AS definer,
       pg_has_role(current_user, p.proowner, 'USAGE') AS ours,
       EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
               WHERE a.grantee = 0) AS public,
       EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
               WHERE a.grantee = to_regrole(%(app)s)) AS app,
       EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
               WHERE a.grantee = to_regrole(%(ops)s)) AS ops
FROM pg_proc p
WHERE p.pronamespace = 'public'::regnamespace
  AND p.prorettype <> 'trigger'::regtype
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1

-- readonly_defaults --
-- Whether tables and sequences the current role creates later (audit_log's monthly
-- partitions, made at run time) come with SELECT for the readonly role.
SELECT count(*) FILTER (WHERE d.defaclobjtype = 'r') > 0 AS tables,
       count(*) FILTER (WHERE d.defaclobjtype = 'S') > 0 AS sequences
FROM pg_default_acl d, aclexplode(d.defaclacl) a
WHERE d.defaclrole = to_regrole(current_user)
  AND d.defaclnamespace = 'public'::regnamespace
  AND a.grantee = to_regrole(%(readonly)s)
  AND a.privilege_type = 'SELECT'

-- memberships --
-- Which of the wanted (member, role) pairs hold already; both roles must exist.
SELECT m.member, m.role,
       to_regrole(m.member) IS NOT NULL AND to_regrole(m.role) IS NOT NULL AS possible,
       to_regrole(m.member) IS NOT NULL AND to_regrole(m.role) IS NOT NULL
           AND pg_has_role(m.member::name, m.role::name, 'MEMBER') AS held
FROM unnest(%(members)s::text[], %(roles)s::text[]) AS m(member, role)

-- unpinned_functions --
-- Our PL/pgSQL functions (triggers included) whose search_path is not pinned to public with
-- pg_temp last. Unpinned, a session's temporary table named like ours (`events`,
-- `parks`) comes first: a definer function writes into it, a guard trigger reads it.
SELECT p.oid::regprocedure::text AS signature
FROM pg_proc p
JOIN pg_language l ON l.oid = p.prolang
WHERE p.pronamespace = 'public'::regnamespace
  AND l.lanname = 'plpgsql'
  AND p.proname NOT LIKE 'procrastinate%%'
  AND pg_has_role(current_user, p.proowner, 'USAGE')
  AND NOT EXISTS (
      SELECT 1 FROM pg_depend d
      WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  AND NOT coalesce('search_path=public, pg_temp' = ANY (p.proconfig), false)
ORDER BY 1
