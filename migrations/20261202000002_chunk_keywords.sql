-- Keyword search's words move out of document_chunks into a table of their own, chunk_keywords (issue 20, review
-- of 20261201000001_hybrid_search.sql).
--
-- Why: content_tsv was a column of document_chunks with a GIN index, so computing it (the backfill after the
-- migration, every change of `search.text_config`) rewrote every chunk row: a new tuple version with a new entry
-- in every index of the table, each model's HNSW index among them, and the WAL and bloat of all that. Here a
-- chunk's words are a row of chunk_keywords, written by a trigger when the chunk's text is written and by the
-- backfill; the chunk rows are left alone.
--
-- Keyword search's cost follows the caller's chunks, not the table: the index is GIN over (user_id, tsv), with
-- btree_gin for the uuid column, so `user_id = current_user_id() AND tsv @@ query` is one index condition.
--
-- Locks: everything here changes the catalogue only (the new table is empty; dropping columns does not rewrite the
-- table), so the migration holds its ACCESS EXCLUSIVE lock on document_chunks (CREATE POLICY, DROP COLUMN) for
-- milliseconds, and no index is built over existing rows (so no CREATE INDEX CONCURRENTLY, which sqlx could only
-- run as the sole statement of a `-- no-transaction` file). The existing chunks' words are not copied from
-- content_tsv: a copy made while the chunk stage keeps writing would hold rows computed from text replaced or
-- deleted meanwhile, unless it stopped those writes for its duration. They are recomputed instead, exactly, by the
-- backfill (db::backfill_keywords; `producer migrate` runs it to completion), and keyword search skips a chunk
-- until its row exists (hybrid search still finds it by its vector).

CREATE EXTENSION IF NOT EXISTS btree_gin;

-- The words of every chunk, in the text-search configuration `config`. Only its owner reads and writes it: the
-- trigger below and keyword_candidates are SECURITY DEFINER, and the app role has no grant on it. Row-level
-- security is enabled (should a grant ever be made, a role sees its user's rows only) but not forced: the owner,
-- the role that ran the migrations, reads it whole, so that keyword_candidates' `tsv @@ query` can be an index
-- condition (under a policy it could not be: ts_match_vq is not leakproof), whether or not that role bypasses
-- row-level security.
CREATE TABLE upload_pipeline.chunk_keywords (
  chunk_id    uuid PRIMARY KEY REFERENCES upload_pipeline.document_chunks (id) ON DELETE CASCADE,
  user_id     uuid NOT NULL,
  document_id uuid NOT NULL,
  tsv         tsvector NOT NULL,
  config      regconfig NOT NULL
);
CREATE INDEX chunk_keywords_user_tsv ON upload_pipeline.chunk_keywords USING gin (user_id, tsv);
ALTER TABLE upload_pipeline.chunk_keywords ENABLE ROW LEVEL SECURITY;
CREATE POLICY owner ON upload_pipeline.chunk_keywords USING (user_id = upload_pipeline.current_user_id())
  WITH CHECK (user_id = upload_pipeline.current_user_id());

-- The backfill reads every chunk, and document_chunks forces its policy on its owner too. A migrating role that
-- bypasses row-level security (a superuser, BYPASSRLS) reads them anyway; one that does not (managed Postgres
-- often gives no BYPASSRLS) gets this policy, which lets it read (never write) every chunk. The role owns the table
-- and could lift the policy itself; unlike lifting it (ALTER TABLE ... NO FORCE ROW LEVEL SECURITY, an ACCESS
-- EXCLUSIVE lock, which the previous backfill took for every batch), the policy is created once, here. The app
-- role is not that role (begin_as switches to it), so requests never see it.
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))
  THEN
    EXECUTE format('CREATE POLICY keyword_backfill ON upload_pipeline.document_chunks FOR SELECT TO %I USING (true)',
                   current_user);
  END IF;
END
$$;

-- Writes a chunk's row of chunk_keywords, in the configuration in force: fired after a chunk is inserted, and after
-- an update that changed its text (the chunk stage's upsert sets `content` on every conflict; an unchanged text
-- is not recomputed). Volatile, so it reads the configuration committed last: set_text_search_config waits for the
-- chunk writes under way, so a write committed after a change is in the new configuration.
CREATE FUNCTION upload_pipeline.chunk_keywords_write() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
DECLARE
  v_config regconfig := upload_pipeline.text_search_config();
BEGIN
  INSERT INTO upload_pipeline.chunk_keywords AS k (chunk_id, user_id, document_id, tsv, config)
  VALUES (NEW.id, NEW.user_id, NEW.document_id, to_tsvector(v_config, NEW.content), v_config)
  ON CONFLICT (chunk_id) DO UPDATE
  SET user_id = excluded.user_id, document_id = excluded.document_id, tsv = excluded.tsv, config = excluded.config;
  RETURN NULL;
END
$$;

DROP TRIGGER document_chunks_tsv ON upload_pipeline.document_chunks;
DROP FUNCTION upload_pipeline.document_chunks_tsv();
CREATE TRIGGER chunk_keywords_insert AFTER INSERT ON upload_pipeline.document_chunks
  FOR EACH ROW EXECUTE FUNCTION upload_pipeline.chunk_keywords_write();
CREATE TRIGGER chunk_keywords_update AFTER UPDATE OF content, user_id, document_id ON upload_pipeline.document_chunks
  FOR EACH ROW
  WHEN (OLD.content IS DISTINCT FROM NEW.content OR OLD.user_id IS DISTINCT FROM NEW.user_id
        OR OLD.document_id IS DISTINCT FROM NEW.document_id)
  EXECUTE FUNCTION upload_pipeline.chunk_keywords_write();

DROP FUNCTION upload_pipeline.backfill_content_tsv(uuid, integer);
DROP INDEX upload_pipeline.document_chunks_content_tsv;
ALTER TABLE upload_pipeline.document_chunks DROP COLUMN content_tsv, DROP COLUMN content_tsv_config;

-- Passes of the backfill are counted, not named: `generation` goes up with every change of the configuration, and
-- indexed_generation is the generation whose pass completed (every chunk then had its row in that generation's
-- configuration). A pass is due while they differ. Comparing configurations instead marked a pass complete after
-- a change A -> B -> A during it, with the chunks recomputed in B meanwhile left in B. indexed_config stays, for
-- readers: the configuration of the last complete pass, NULL while one is due. NULL here: the existing chunks have
-- no rows yet.
ALTER TABLE upload_pipeline.text_search
  ADD COLUMN generation bigint NOT NULL DEFAULT 1,
  ADD COLUMN indexed_generation bigint;
UPDATE upload_pipeline.text_search SET indexed_config = NULL;

-- Stores the text-search configuration (`search.text_config`; run by `producer migrate` only, so that replicas of
-- different settings in a rolling deploy do not take turns changing it); returns whether it changed. It recomputes
-- nothing: the next backfill pass does, a batch at a time. It waits for the chunk writes under way (a SHARE lock on
-- document_chunks, at most lock_timeout), so every chunk written after it returns is in the new configuration.
CREATE OR REPLACE FUNCTION upload_pipeline.set_text_search_config(p_config regconfig) RETURNS boolean
LANGUAGE plpgsql
SET lock_timeout = '10s'
AS $$
DECLARE
  v_old regconfig;
BEGIN
  IF p_config IS NULL THEN
    RAISE EXCEPTION 'the text search configuration must not be null' USING ERRCODE = 'invalid_parameter_value';
  END IF;
  SELECT t.config INTO v_old FROM upload_pipeline.text_search t FOR UPDATE;
  IF v_old = p_config THEN
    RETURN false;
  END IF;
  LOCK TABLE upload_pipeline.document_chunks IN SHARE MODE;
  UPDATE upload_pipeline.text_search
  SET config = p_config, generation = generation + 1, indexed_config = NULL, updated_at = now();
  RETURN true;
END
$$;

-- One batch of the backfill pass of generation `p_generation`: of the `p_limit` chunks after `p_after` in id order
-- (NULL: from the first), writes the chunk_keywords row of those without one in the configuration in force.
-- Returns the last id looked at (NULL: none left, the pass is over), the rows written, and the generation in
-- force: when that is not `p_generation` the configuration changed, nothing was done, and the pass starts over.
-- Each call is meant to be its own transaction (db::backfill_keywords loops over it); it reads the chunks and
-- writes chunk_keywords only, so chunk writes never wait for it, and a chunk write racing it is kept: the upsert
-- leaves a row that a trigger wrote meanwhile in the configuration in force (from the newer text) as it is. A
-- chunk deleted meanwhile fails the batch's foreign key check (23503); the batch is then tried again.
CREATE FUNCTION upload_pipeline.backfill_chunk_keywords(
  p_after uuid, p_limit integer, p_generation bigint,
  OUT last_id uuid, OUT recomputed integer, OUT current_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_config regconfig;
  v_ids    uuid[];
BEGIN
  IF p_limit IS NULL OR p_limit NOT BETWEEN 1 AND 100000 THEN
    RAISE EXCEPTION 'p_limit must be between 1 and 100000, got %', p_limit USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- Under row-level security without the policy above (another role than the one that migrated), the chunks
  -- would look like none and the pass would be marked complete having read nothing.
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))
     AND NOT EXISTS (
       SELECT 1 FROM pg_catalog.pg_policy p
       WHERE p.polrelid = 'upload_pipeline.document_chunks'::regclass AND p.polname = 'keyword_backfill'
         AND EXISTS (SELECT 1 FROM unnest(p.polroles) r(oid) WHERE pg_catalog.pg_has_role(current_user, r.oid, 'USAGE')))
  THEN
    RAISE EXCEPTION 'the role % cannot read every chunk: it does not bypass row-level security and the policy '
      'keyword_backfill of upload_pipeline.document_chunks is not for it', current_user
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Run the backfill as the role that ran the migrations, or give this role BYPASSRLS.';
  END IF;
  recomputed := 0;
  SELECT t.config, t.generation INTO v_config, current_generation FROM upload_pipeline.text_search t;
  IF current_generation IS DISTINCT FROM p_generation THEN
    RETURN;
  END IF;
  -- Two statements rather than `p_after IS NULL OR c.id > p_after`, which a generic plan could not bound.
  IF p_after IS NULL THEN
    SELECT array_agg(b.id ORDER BY b.id) INTO v_ids
    FROM (SELECT c.id FROM upload_pipeline.document_chunks c ORDER BY c.id LIMIT p_limit) b;
  ELSE
    SELECT array_agg(b.id ORDER BY b.id) INTO v_ids
    FROM (SELECT c.id FROM upload_pipeline.document_chunks c WHERE c.id > p_after ORDER BY c.id LIMIT p_limit) b;
  END IF;
  last_id := v_ids[cardinality(v_ids)];
  -- The WHERE of the conflict branch sees the row's latest committed version, not this statement's snapshot: a
  -- row a chunk write put there after the snapshot was taken is already in v_config, from the newer text, and stays.
  INSERT INTO upload_pipeline.chunk_keywords AS k (chunk_id, user_id, document_id, tsv, config)
  SELECT c.id, c.user_id, c.document_id, to_tsvector(v_config, c.content), v_config
  FROM upload_pipeline.document_chunks c
  WHERE c.id = ANY (v_ids)
    AND NOT EXISTS (SELECT 1 FROM upload_pipeline.chunk_keywords o WHERE o.chunk_id = c.id AND o.config = v_config)
  ORDER BY c.id
  ON CONFLICT (chunk_id) DO UPDATE
  SET user_id = excluded.user_id, document_id = excluded.document_id, tsv = excluded.tsv, config = excluded.config
  WHERE k.config IS DISTINCT FROM excluded.config;
  GET DIAGNOSTICS recomputed = ROW_COUNT;
END
$$;

-- keyword_candidates (unchanged: SECURITY DEFINER, `user_id = current_user_id()`, ids and ranks only) now reads
-- chunk_keywords: both conditions go to the (user_id, tsv) index. $1 tsquery, $2 the documents to look in (NULL:
-- every ready one), $3 count. The tsquery is built in the configuration in force; a chunk whose row is still in an
-- older one (a pass after a change is under way) matches where both configurations reduce the words alike.
CREATE OR REPLACE FUNCTION upload_pipeline.keyword_candidates_sql() RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT 'SELECT k.chunk_id AS id, ts_rank_cd(k.tsv, $1, 32) AS rank '
         'FROM upload_pipeline.chunk_keywords k JOIN upload_pipeline.documents d ON d.id = k.document_id '
         'WHERE k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ $1 AND d.user_id = k.user_id '
         'AND d.status = ''ready'' AND ($2::uuid[] IS NULL OR k.document_id = ANY ($2)) '
         'ORDER BY rank DESC, k.chunk_id LIMIT $3'
$$;

-- The trigger function and the backfill are the owner's (Postgres lets PUBLIC execute every new function).
REVOKE EXECUTE ON FUNCTION upload_pipeline.chunk_keywords_write() FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION upload_pipeline.backfill_chunk_keywords(uuid, integer, bigint) FROM PUBLIC;
