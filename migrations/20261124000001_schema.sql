-- The upload_pipeline schema: documents and their bytes, per-stage job records, parsed content, chunks with
-- embeddings, and row-level security scoped to the owning user.
--
-- Every request and every stage runs in a transaction that takes the role upload_pipeline_app (no BYPASSRLS)
-- and sets upload_pipeline.user_id; the policies below then show each user only their own rows, whatever the
-- query. The few fleet-wide reads (the reconciler) go through SECURITY DEFINER functions.

CREATE EXTENSION IF NOT EXISTS vector;
CREATE SCHEMA IF NOT EXISTS upload_pipeline;

DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'upload_pipeline_app') THEN
    CREATE ROLE upload_pipeline_app NOLOGIN NOSUPERUSER NOBYPASSRLS;
  END IF;
END
$$;

-- The user whose rows the current transaction may see (NULL: none).
CREATE FUNCTION upload_pipeline.current_user_id() RETURNS uuid
LANGUAGE sql STABLE AS $$ SELECT nullif(current_setting('upload_pipeline.user_id', true), '')::uuid $$;

CREATE TABLE upload_pipeline.documents (
  id              uuid PRIMARY KEY,
  user_id         uuid NOT NULL,
  filename        text NOT NULL,
  content_type    text NOT NULL,
  size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
  sha256          text NOT NULL,
  status          text NOT NULL DEFAULT 'queued'
                  CHECK (status IN ('queued', 'parsing', 'chunking', 'embedding', 'ready', 'failed')),
  error           text,
  metadata        jsonb NOT NULL DEFAULT '{}',
  idempotency_key text,
  chunks_total    integer,
  created_at      timestamptz NOT NULL DEFAULT now(),
  updated_at      timestamptz NOT NULL DEFAULT now(),
  ready_at        timestamptz,
  UNIQUE (user_id, sha256),
  UNIQUE (user_id, idempotency_key)
);
CREATE INDEX documents_user_created ON upload_pipeline.documents (user_id, created_at DESC, id DESC);

-- The uploaded bytes, in Postgres so every worker host can reach them.
CREATE TABLE upload_pipeline.document_bytes (
  document_id uuid PRIMARY KEY REFERENCES upload_pipeline.documents (id) ON DELETE CASCADE,
  user_id     uuid NOT NULL,
  bytes       bytea NOT NULL
);

-- What the parse stage made of the bytes: Markdown sections, each with its page when the format has pages.
CREATE TABLE upload_pipeline.document_parsed (
  document_id uuid PRIMARY KEY REFERENCES upload_pipeline.documents (id) ON DELETE CASCADE,
  user_id     uuid NOT NULL,
  parser      text NOT NULL,
  sections    jsonb NOT NULL,
  created_at  timestamptz NOT NULL DEFAULT now()
);

-- The durable record of progress: one row per document and stage.
CREATE TABLE upload_pipeline.upload_jobs (
  document_id uuid NOT NULL REFERENCES upload_pipeline.documents (id) ON DELETE CASCADE,
  stage       text NOT NULL CHECK (stage IN ('parse', 'chunk', 'embed')),
  user_id     uuid NOT NULL,
  state       text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed', 'dead')),
  attempts    integer NOT NULL DEFAULT 0,
  last_error  text,
  queued_at   timestamptz NOT NULL DEFAULT now(),
  started_at  timestamptz,
  finished_at timestamptz,
  updated_at  timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (document_id, stage)
);
CREATE INDEX upload_jobs_unsettled ON upload_pipeline.upload_jobs (updated_at) WHERE state IN ('queued', 'running', 'failed');

-- Chunks and their embeddings. The vector column has no fixed dimension: each embedding model gets its own
-- partial HNSW index over embedding::vector(<dims>) (see register_embedding_model), so a new model or dimension
-- needs no migration.
CREATE TABLE upload_pipeline.document_chunks (
  id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  document_id     uuid NOT NULL REFERENCES upload_pipeline.documents (id) ON DELETE CASCADE,
  user_id         uuid NOT NULL,
  chunk_index     integer NOT NULL CHECK (chunk_index >= 0),
  content         text NOT NULL,
  token_count     integer NOT NULL,
  content_sha256  text NOT NULL,
  embedding       vector,
  embedding_model text,
  metadata        jsonb NOT NULL DEFAULT '{}',
  created_at      timestamptz NOT NULL DEFAULT now(),
  UNIQUE (document_id, chunk_index)
);
CREATE INDEX document_chunks_unembedded ON upload_pipeline.document_chunks (document_id) WHERE embedding IS NULL;

CREATE TABLE upload_pipeline.embedding_models (
  model      text PRIMARY KEY,
  dimensions integer NOT NULL CHECK (dimensions BETWEEN 1 AND 2000),
  index_name text NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now()
);

-- Registers an embedding model and creates its HNSW cosine index (idempotent). Run by `producer migrate` and at
-- start-up for the configured model.
CREATE FUNCTION upload_pipeline.register_embedding_model(p_model text, p_dimensions integer) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
  idx text := left('document_chunks_hnsw_' || regexp_replace(lower(p_model), '[^a-z0-9]+', '_', 'g'), 45)
              || '_' || p_dimensions || '_' || left(md5(p_model), 6);
BEGIN
  IF p_dimensions IS NULL OR p_dimensions < 1 OR p_dimensions > 2000 THEN
    RAISE EXCEPTION 'embedding dimensions must be between 1 and 2000 for an HNSW index, got %', p_dimensions;
  END IF;
  EXECUTE format(
    'CREATE INDEX IF NOT EXISTS %I ON upload_pipeline.document_chunks USING hnsw ((embedding::vector(%s)) vector_cosine_ops) WHERE embedding_model = %L',
    idx, p_dimensions, p_model);
  INSERT INTO upload_pipeline.embedding_models (model, dimensions, index_name) VALUES (p_model, p_dimensions, idx)
  ON CONFLICT (model) DO UPDATE SET dimensions = excluded.dimensions, index_name = excluded.index_name;
  RETURN idx;
END
$$;

-- The query match_chunks runs, so tests can EXPLAIN exactly that: $1 query vector, $2 metadata filter, $3 count.
CREATE FUNCTION upload_pipeline.match_chunks_sql(p_model text, p_dimensions integer, p_filtered boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, '
    '1 - (c.embedding::vector(%1$s) <=> $1::vector(%1$s)) AS similarity '
    'FROM upload_pipeline.document_chunks c WHERE c.embedding_model = %2$L %3$s'
    'ORDER BY c.embedding::vector(%1$s) <=> $1::vector(%1$s) LIMIT $3',
    p_dimensions, p_model, CASE WHEN p_filtered THEN 'AND c.metadata @> $2 ' ELSE '' END)
$$;

-- Top-k chunks of the caller's documents by cosine similarity, for agents that query in SQL:
--   SET upload_pipeline.user_id = '<uuid>';  -- done by the API for its callers
--   SELECT * FROM upload_pipeline.match_chunks('[...]'::vector, 5, '{"page": 2}');
-- filter: metadata the chunks must contain; the key "embedding_model" picks the model (default: the newest
-- registered model of the query's dimension). Row-level security limits the rows to the caller's.
CREATE FUNCTION upload_pipeline.match_chunks(query_embedding vector, match_count integer DEFAULT 10, filter jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, document_id uuid, chunk_index integer, content text, metadata jsonb, similarity double precision)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
AS $$
DECLARE
  dims  integer := vector_dims(query_embedding);
  model text := filter ->> 'embedding_model';
  rest  jsonb := coalesce(filter, '{}') - 'embedding_model';
BEGIN
  IF match_count IS NULL OR match_count < 1 OR match_count > 100 THEN
    RAISE EXCEPTION 'match_count must be between 1 and 100, got %', match_count;
  END IF;
  IF model IS NULL THEN
    SELECT m.model INTO model FROM upload_pipeline.embedding_models m
    WHERE m.dimensions = dims ORDER BY m.created_at DESC LIMIT 1;
  END IF;
  IF model IS NULL THEN
    RAISE EXCEPTION 'no embedding model of % dimensions is registered', dims;
  END IF;
  RETURN QUERY EXECUTE upload_pipeline.match_chunks_sql(model, dims, rest <> '{}')
    USING query_embedding, rest, match_count;
END
$$;

-- Fleet-wide read for the reconciler: stages left queued, running or failed since before the deadline.
CREATE FUNCTION upload_pipeline.stale_jobs(p_before timestamptz, p_limit integer)
RETURNS TABLE (document_id uuid, user_id uuid, stage text, state text, attempts integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
  SELECT j.document_id, j.user_id, j.stage, j.state, j.attempts
  FROM upload_pipeline.upload_jobs j
  WHERE j.state IN ('queued', 'running', 'failed') AND j.updated_at < p_before
  ORDER BY j.updated_at
  LIMIT p_limit
$$;

-- Row-level security on every table, forced for the owner too; each user sees and changes only their rows.
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['documents', 'document_bytes', 'document_parsed', 'upload_jobs', 'document_chunks'] LOOP
    EXECUTE format('ALTER TABLE upload_pipeline.%I ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE upload_pipeline.%I FORCE ROW LEVEL SECURITY', t);
    EXECUTE format(
      'CREATE POLICY owner ON upload_pipeline.%I USING (user_id = upload_pipeline.current_user_id()) '
      'WITH CHECK (user_id = upload_pipeline.current_user_id())', t);
  END LOOP;
END
$$;

GRANT USAGE ON SCHEMA upload_pipeline TO upload_pipeline_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA upload_pipeline TO upload_pipeline_app;
REVOKE INSERT, UPDATE, DELETE ON upload_pipeline.embedding_models FROM upload_pipeline_app;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA upload_pipeline TO upload_pipeline_app;
REVOKE EXECUTE ON FUNCTION upload_pipeline.register_embedding_model(text, integer) FROM upload_pipeline_app, PUBLIC;
