-- The catalog footprint of pg_domain_events in the current database, one row per fact:
-- (kind, name, detail). Two databases hold the same extension schema exactly when these rows
-- are equal. Used by tests/tests/upgrade.rs to compare a database upgraded with ALTER EXTENSION
-- ... UPDATE against a fresh install. No OIDs and no positions in the output: only what a user
-- can observe.
WITH ext AS (
    SELECT e.oid, e.extname, e.extversion, e.extrelocatable, e.extowner, e.extnamespace,
           e.extconfig, e.extcondition
      FROM pg_catalog.pg_extension e
     WHERE e.extname = 'pg_domain_events'
),
ns AS (
    SELECT n.oid, n.nspname, n.nspowner, n.nspacl
      FROM pg_catalog.pg_namespace n
     WHERE n.nspname = 'domain_events'
),
rels AS (
    SELECT c.*
      FROM pg_catalog.pg_class c
      JOIN ns ON c.relnamespace = ns.oid
),
procs AS (
    SELECT p.*
      FROM pg_catalog.pg_proc p
      JOIN ns ON p.pronamespace = ns.oid
),
-- Every grant on the schema, its functions and relations, one per row.
grants AS (
    SELECT o.catalog, o.oid, pg_catalog.format('%s:%s%s by %s',
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee) END,
               a.privilege_type, CASE WHEN a.is_grantable THEN '*' ELSE '' END,
               pg_catalog.pg_get_userbyid(a.grantor)) AS item
      FROM (SELECT 'pg_catalog.pg_namespace'::regclass, ns.oid,
                   COALESCE(ns.nspacl, pg_catalog.acldefault('n', ns.nspowner))
              FROM ns
            UNION ALL
            SELECT 'pg_catalog.pg_proc'::regclass, p.oid,
                   COALESCE(p.proacl, pg_catalog.acldefault('f', p.proowner))
              FROM procs p
            UNION ALL
            SELECT 'pg_catalog.pg_class'::regclass, c.oid, COALESCE(c.relacl, pg_catalog.acldefault(
                       CASE WHEN c.relkind = 'S' THEN 's'::"char" ELSE 'r'::"char" END, c.relowner))
              FROM rels c
             WHERE c.relkind NOT IN ('i', 'I', 't')) AS o(catalog, oid, acl),
           LATERAL pg_catalog.aclexplode(o.acl) a
)
-- The extension itself.
SELECT 'extension' AS kind, e.extname::text AS name,
       pg_catalog.format('version=%s relocatable=%s owner=%s schema=%s',
           e.extversion, e.extrelocatable, pg_catalog.pg_get_userbyid(e.extowner),
           e.extnamespace::regnamespace) AS detail
  FROM ext e
UNION ALL
-- Tables whose rows pg_dump keeps (pg_extension_config_dump), with their filters.
SELECT 'config dump', cfg.rel::regclass::text, COALESCE(cfg.cond, '')
  FROM ext e, LATERAL unnest(e.extconfig, e.extcondition) AS cfg(rel, cond)
UNION ALL
-- Membership: every object pg_depend ties to the extension.
SELECT 'member', pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ''
  FROM pg_catalog.pg_depend d, ext e
 WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = e.oid
   AND d.deptype = 'e'
UNION ALL
SELECT 'schema', ns.nspname::text,
       pg_catalog.format('owner=%s', pg_catalog.pg_get_userbyid(ns.nspowner))
  FROM ns
UNION ALL
-- Privileges (ACLs are expanded: their order in aclitem[] carries no meaning; a NULL ACL is
-- the owner's default, which is what it means).
SELECT 'grant', pg_catalog.format('on %s to %s',
           pg_catalog.pg_describe_object(g.catalog, g.oid, 0), g.item), ''
  FROM grants g
UNION ALL
-- Functions and procedures: the full definition (arguments, defaults, return type,
-- volatility, strictness, parallel safety, SECURITY DEFINER, SET options, body or C symbol),
-- owner and grants.
SELECT 'function', p.oid::regprocedure::text,
       pg_catalog.format(E'owner=%s\n%s', pg_catalog.pg_get_userbyid(p.proowner),
           CASE WHEN p.prokind = 'a' THEN 'aggregate'
                ELSE pg_catalog.pg_get_functiondef(p.oid) END)
  FROM procs p
UNION ALL
-- Relations: tables, partitions, indexes, sequences, views, composite types.
SELECT 'relation', c.relname::text,
       pg_catalog.format('kind=%s persistence=%s owner=%s options=%s replident=%s rls=%s/%s partkey=%s bound=%s parent=%s',
           c.relkind, c.relpersistence, pg_catalog.pg_get_userbyid(c.relowner),
           c.reloptions, c.relreplident, c.relrowsecurity, c.relforcerowsecurity,
           CASE WHEN c.relkind = 'p' THEN pg_catalog.pg_get_partkeydef(c.oid) END,
           pg_catalog.pg_get_expr(c.relpartbound, c.oid),
           (SELECT i.inhparent::regclass::text FROM pg_catalog.pg_inherits i
             WHERE i.inhrelid = c.oid))
  FROM rels c
 WHERE c.relkind <> 't'
UNION ALL
-- Columns in their order (dropped ones are skipped, so the rank, not attnum, is compared:
-- a column an upgrade adds must land where a fresh install puts it, or SELECT * differs).
SELECT 'column', pg_catalog.format('%s.%s', c.relname, a.attname),
       pg_catalog.format('rank=%s type=%s notnull=%s default=%s identity=%s generated=%s collation=%s acl=%s',
           rank() OVER (PARTITION BY c.oid ORDER BY a.attnum),
           pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
           pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attidentity, a.attgenerated,
           CASE WHEN a.attcollation <> 0 THEN a.attcollation::regcollation::text END,
           a.attacl)
  FROM rels c
  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
 WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'c')
UNION ALL
SELECT 'constraint', pg_catalog.format('%s.%s', c.relname, k.conname),
       pg_catalog.format('%s deferrable=%s deferred=%s validated=%s',
           pg_catalog.pg_get_constraintdef(k.oid), k.condeferrable, k.condeferred,
           k.convalidated)
  FROM pg_catalog.pg_constraint k
  JOIN rels c ON c.oid = k.conrelid
UNION ALL
SELECT 'index', i.relname::text, pg_catalog.pg_get_indexdef(i.oid)
  FROM rels i
 WHERE i.relkind IN ('i', 'I')
UNION ALL
-- Triggers with their enabled state (O, D, R, A: ALWAYS matters here).
SELECT 'trigger', pg_catalog.format('%s.%s', c.relname, t.tgname),
       pg_catalog.format('%s enabled=%s', pg_catalog.pg_get_triggerdef(t.oid), t.tgenabled)
  FROM pg_catalog.pg_trigger t
  JOIN rels c ON c.oid = t.tgrelid
 WHERE NOT t.tgisinternal
UNION ALL
SELECT 'view', v.relname::text, pg_catalog.pg_get_viewdef(v.oid)
  FROM rels v
 WHERE v.relkind IN ('v', 'm')
UNION ALL
SELECT 'rule', pg_catalog.format('%s.%s', c.relname, r.rulename), pg_catalog.pg_get_ruledef(r.oid)
  FROM pg_catalog.pg_rewrite r
  JOIN rels c ON c.oid = r.ev_class
 WHERE r.rulename <> '_RETURN'
UNION ALL
SELECT 'policy', pg_catalog.format('%s.%s', c.relname, p.polname),
       pg_catalog.format('cmd=%s permissive=%s roles=%s using=%s check=%s', p.polcmd,
           p.polpermissive, p.polroles::regrole[], pg_catalog.pg_get_expr(p.polqual, p.polrelid),
           pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))
  FROM pg_catalog.pg_policy p
  JOIN rels c ON c.oid = p.polrelid
UNION ALL
SELECT 'sequence', c.relname::text,
       pg_catalog.format('type=%s start=%s increment=%s min=%s max=%s cache=%s cycle=%s owned_by=%s',
           s.seqtypid::regtype, s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache,
           s.seqcycle,
           (SELECT pg_catalog.format('%s.%s', d.refobjid::regclass, a.attname)
              FROM pg_catalog.pg_depend d
              JOIN pg_catalog.pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
             WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
               AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.deptype IN ('a', 'i')))
  FROM rels c
  JOIN pg_catalog.pg_sequence s ON s.seqrelid = c.oid
UNION ALL
-- Types of their own (enums, domains, ranges, base types); row types come with their relation.
SELECT 'type', t.typname::text,
       pg_catalog.format('type=%s owner=%s base=%s labels=%s default=%s notnull=%s',
           t.typtype, pg_catalog.pg_get_userbyid(t.typowner),
           CASE WHEN t.typbasetype <> 0 THEN pg_catalog.format_type(t.typbasetype, t.typtypmod) END,
           (SELECT pg_catalog.string_agg(l.enumlabel, ',' ORDER BY l.enumsortorder)
              FROM pg_catalog.pg_enum l WHERE l.enumtypid = t.oid),
           t.typdefault, t.typnotnull)
  FROM pg_catalog.pg_type t
  JOIN ns ON t.typnamespace = ns.oid
 WHERE t.typrelid = 0 AND t.typelem = 0
UNION ALL
SELECT 'domain constraint', pg_catalog.format('%s.%s', t.typname, k.conname),
       pg_catalog.pg_get_constraintdef(k.oid)
  FROM pg_catalog.pg_constraint k
  JOIN pg_catalog.pg_type t ON t.oid = k.contypid
  JOIN ns ON t.typnamespace = ns.oid
UNION ALL
SELECT 'event trigger', et.evtname::text,
       pg_catalog.format('event=%s function=%s enabled=%s tags=%s', et.evtevent,
           et.evtfoid::regprocedure, et.evtenabled, et.evttags)
  FROM pg_catalog.pg_event_trigger et
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_event_trigger'::regclass
       AND d.objid = et.oid AND d.deptype = 'e'
  JOIN ext e ON d.refobjid = e.oid
UNION ALL
SELECT 'default acl', pg_catalog.format('%s %s', pg_catalog.pg_get_userbyid(da.defaclrole),
           da.defaclobjtype), da.defaclacl::text
  FROM pg_catalog.pg_default_acl da
  JOIN ns ON da.defaclnamespace = ns.oid
UNION ALL
-- Comments on the extension's objects (and their columns).
SELECT 'comment', pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description
  FROM pg_catalog.pg_description d
 WHERE (d.classoid = 'pg_catalog.pg_class'::regclass AND d.objoid IN (SELECT oid FROM rels))
    OR (d.classoid = 'pg_catalog.pg_proc'::regclass AND d.objoid IN (SELECT oid FROM procs))
    OR (d.classoid = 'pg_catalog.pg_namespace'::regclass AND d.objoid IN (SELECT oid FROM ns))
    OR (d.classoid = 'pg_catalog.pg_extension'::regclass AND d.objoid IN (SELECT oid FROM ext))
ORDER BY 1, 2, 3
