-- Each large tenant walks an HNSW graph of its own chunks (issue 20, item 4: tenant-correct recall at any size,
-- p95 within 20 ms).
--
-- Until now a tenant above upload_pipeline.exact_search_chunks() (5,000) walked the model's one graph, every
-- tenant's chunks in it, keeping its own as the walk met them (20261202000001_tenant_search.sql). Measured (`make
-- bench`, scenario `search`: 1,000,000 chunks across 1,000 tenants of 10 to 300,000): a tenant owning 0.5 % to 10 %
-- of the graph meets thousands of other tenants' chunks for each of its own, and the walk is long (vector search p95
-- 91.8 ms for tenants of 1,000-9,999 chunks, 309 ms for 10,000-99,999) and misses (recall@10 of the worst query
-- 0.4, and 0.3 for the 300,000-chunk tenant, whose walk relaxed_order cut short).
--
-- Now such a tenant gets an HNSW index of its own: a partial index of the model's chunks WHERE user_id = the
-- tenant, named tenant_index_name(user, model). The vector list's graph query names the caller's id as a constant
-- when that index is built and valid (tenant_index_ready), so the planner proves the index's predicate and walks
-- it: a graph of the tenant's chunks only, whose first rows are all the tenant's. The model's shared graph stays
-- for a tenant whose own index is not built yet (it grew past the limit since the last maintenance pass).
--
-- Who builds them: `producer serve` (when it holds the owner's credentials) every `search.tenant_index_interval`,
-- and `producer tenant-indexes` (the owner's credentials, once), both through db::maintain_tenant_indexes: one
-- process at a time (an advisory lock) reads tenant_index_plan and runs each statement it names, DROP INDEX
-- CONCURRENTLY for a tenant whose chunks fell under half the limit (or whose model is gone) and CREATE INDEX
-- CONCURRENTLY (chunk writes go on meanwhile) for one above it, at most 64 in all, the largest first. A build that
-- failed or was cancelled (a timeout, a restart) leaves an invalid index, which search never uses
-- (tenant_index_ready) and the next pass drops (and builds again if the tenant is still above the limit).
-- docs/operations.md has the rest (locks, timeouts, sizing).
-- The price: a large tenant's chunk writes update two HNSW graphs (the model's and its own), and its own graph takes
-- the space of its chunks' vectors once more.

-- The name of `p_user`'s own index of `p_model`'s chunks (the user's id, a hash of the model: 55 characters).
CREATE FUNCTION upload_pipeline.tenant_index_name(p_user uuid, p_model text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT 'chunks_tenant_' || replace(p_user::text, '-', '') || '_' || left(md5(p_model), 8)
$$;

-- Whether the caller has an index of its own of `p_model`'s chunks that a search may walk: built and valid (a
-- concurrent build under way, or one that failed, is not).
CREATE FUNCTION upload_pipeline.tenant_index_ready(p_model text) RETURNS boolean
LANGUAGE sql STABLE AS $$
  SELECT coalesce((SELECT i.indisvalid AND i.indisready FROM pg_catalog.pg_index i
                   WHERE i.indexrelid = to_regclass(format('upload_pipeline.%I',
                     upload_pipeline.tenant_index_name(upload_pipeline.current_user_id(), p_model)))), false)
$$;

-- What a maintenance pass does, for a limit of `p_limit` chunks (exact_search_chunks(); 0: no own indexes, every
-- one dropped): 'drop' each index whose tenant has under half the limit (the margin keeps a tenant near it from
-- being built and dropped by turns), whose model is no longer registered, or that is invalid (a build that failed
-- or was cancelled: never searched, but locked by every statement on the table); then 'build', the largest
-- tenants first, each (user, model) whose chunks are more than the limit and that has no valid index of its own
-- (`invalid`: it had a failed build's, dropped just before), while fewer than 64 valid indexes remain: once 64
-- exist, a tenant that grows past an indexed one waits until one is dropped. The cap: every
-- statement on document_chunks (a search's plan, a chunk's insert) opens and locks each of its indexes, and past
-- 16 a session's locks go to the shared lock table (`max_locks_per_transaction` x connections entries). So own
-- indexes are for the few largest tenants; docs/operations.md says how to size the lock table for them.
-- `statement`: the DDL to run, outside a transaction. Chunks are counted by one pass over
-- document_chunks_user_model (an index-only scan: about 0.2 s a million chunks), as the owner sees them: a
-- migrating role without BYPASSRLS reads every chunk through the keyword_backfill policy
-- (20261202000002_chunk_keywords.sql). A role that can read neither way would count no chunks and drop every
-- index: it is refused, as the keyword backfill refuses it.
CREATE FUNCTION upload_pipeline.tenant_index_plan(p_limit integer)
RETURNS TABLE (action text, index_name text, user_id uuid, embedding_model text, chunks bigint, invalid boolean,
               statement text)
LANGUAGE plpgsql STABLE AS $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = current_user AND (r.rolsuper OR r.rolbypassrls))
     AND NOT EXISTS (
       SELECT 1 FROM pg_catalog.pg_policy p
       WHERE p.polrelid = 'upload_pipeline.document_chunks'::regclass AND p.polname = 'keyword_backfill'
         AND EXISTS (SELECT 1 FROM unnest(p.polroles) r(oid) WHERE pg_catalog.pg_has_role(current_user, r.oid, 'USAGE')))
  THEN
    RAISE EXCEPTION 'the role % cannot count every chunk: it does not bypass row-level security and the policy '
      'keyword_backfill of upload_pipeline.document_chunks is not for it', current_user
      USING ERRCODE = 'insufficient_privilege',
            HINT = 'Maintain the tenant indexes as the role that ran the migrations, or give this role BYPASSRLS.';
  END IF;
  RETURN QUERY
  WITH have AS (
    SELECT c.relname::text AS index_name, i.indisvalid AND i.indisready AS valid,
           substring(c.relname FROM 15 FOR 32)::uuid AS user_id
    FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = 'upload_pipeline.document_chunks'::regclass
      AND c.relname ~ '^chunks_tenant_[0-9a-f]{32}_[0-9a-f]{8}$'),
  have_model AS (
    SELECT h.*, (SELECT m.model FROM upload_pipeline.embedding_models m
                 WHERE upload_pipeline.tenant_index_name(h.user_id, m.model) = h.index_name LIMIT 1) AS model
    FROM have h),
  counted AS (
    SELECT c.user_id, c.embedding_model AS model, m.dimensions, m.vector_type,
           upload_pipeline.tenant_index_name(c.user_id, c.embedding_model) AS index_name, count(*) AS chunks
    FROM upload_pipeline.document_chunks c JOIN upload_pipeline.embedding_models m ON m.model = c.embedding_model
    WHERE p_limit > 0
    GROUP BY c.user_id, c.embedding_model, m.dimensions, m.vector_type
    HAVING count(*) >= p_limit / 2),
  dropped AS (
    SELECT h.index_name, h.user_id, h.model, coalesce(n.chunks, 0) AS chunks, NOT h.valid AS invalid
    FROM have_model h LEFT JOIN counted n ON n.index_name = h.index_name
    WHERE h.model IS NULL OR NOT h.valid OR coalesce(n.chunks, 0) < p_limit / 2 OR p_limit <= 0),
  build AS (
    SELECT n.*, h.valid IS NOT NULL AS invalid FROM counted n LEFT JOIN have h ON h.index_name = n.index_name
    WHERE p_limit > 0 AND n.chunks > p_limit AND h.valid IS NOT TRUE
    ORDER BY n.chunks DESC, n.index_name
    LIMIT greatest(64 - (SELECT count(*) FROM have h WHERE h.valid
                         AND h.index_name NOT IN (SELECT d.index_name FROM dropped d)), 0))
  SELECT x.action, x.index_name, x.user_id, x.model, x.chunks, x.invalid, x.statement
  FROM (
    SELECT 1 AS step, 'drop'::text AS action, d.index_name, d.user_id, d.model, d.chunks, d.invalid,
           format('DROP INDEX CONCURRENTLY IF EXISTS upload_pipeline.%I', d.index_name) AS statement
    FROM dropped d
    UNION ALL
    SELECT 2, 'build', b.index_name, b.user_id, b.model, b.chunks, b.invalid,
           format('CREATE INDEX CONCURRENTLY %I ON upload_pipeline.document_chunks '
                  'USING hnsw ((embedding::%s(%s)) %s_cosine_ops) WHERE user_id = %L::uuid AND embedding_model = %L',
                  b.index_name, b.vector_type, b.dimensions, b.vector_type, b.user_id, b.model)
    FROM build b) x
  ORDER BY x.step, x.chunks DESC, x.index_name;
END
$$;

-- The vector list (20261202000001_tenant_search.sql), its graph query naming the caller `p_tenant` (a constant, not
-- current_user_id(), which the planner cannot prove a partial index's predicate from) when the caller has an
-- index of its own: the planner walks it. NULL: the model's graph, as before.
CREATE FUNCTION upload_pipeline.vector_list_sql(
  p_model text, p_dimensions integer, p_exact boolean, p_documents text, p_condition text, p_count text,
  p_tenant uuid)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    CASE WHEN p_exact THEN
      'SELECT e.id, e.distance FROM (SELECT c.id, c.embedding::%1$s(%2$s) <=> $1::%1$s(%2$s) AS distance '
      'FROM upload_pipeline.document_chunks c %3$s%4$sOFFSET 0) e ORDER BY e.distance, e.id LIMIT %5$s'
    ELSE
      'SELECT c.id, c.embedding::%1$s(%2$s) <=> $1::%1$s(%2$s) AS distance '
      'FROM upload_pipeline.document_chunks c %3$s%4$s'
      'ORDER BY c.embedding::%1$s(%2$s) <=> $1::%1$s(%2$s) LIMIT %5$s'
    END,
    upload_pipeline.vector_type_for(p_dimensions), p_dimensions,
    CASE WHEN p_documents IS NOT NULL
      THEN format('WHERE c.embedding_model = %L AND c.document_id = ANY (%s) ', p_model, p_documents)
      ELSE format('JOIN upload_pipeline.documents d ON d.id = c.document_id '
                  'WHERE c.embedding_model = %L AND d.status = ''ready'' '
                  'AND d.user_id = upload_pipeline.current_user_id() ', p_model)
    END,
    CASE WHEN p_exact THEN 'AND c.user_id = upload_pipeline.current_user_id() '
         WHEN p_tenant IS NOT NULL THEN format('AND c.user_id = %L::uuid ', p_tenant)
         ELSE '' END
    || CASE WHEN p_condition IS NOT NULL THEN format('AND %s ', p_condition) ELSE '' END,
    p_count)
$$;

CREATE OR REPLACE FUNCTION upload_pipeline.vector_list_sql(
  p_model text, p_dimensions integer, p_exact boolean, p_documents text, p_condition text, p_count text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT upload_pipeline.vector_list_sql(p_model, p_dimensions, p_exact, p_documents, p_condition, p_count, NULL)
$$;

-- search_chunks' query (20261204000000_sentence_keywords.sql), its vector list walking the caller's own index when
-- `p_tenant` names the caller (see vector_list_sql).
CREATE FUNCTION upload_pipeline.search_chunks_sql(
  p_mode text, p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean, p_list text, p_tenant uuid)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'WITH %1$s fused AS (%2$s), '
    'top AS MATERIALIZED (SELECT f.id, f.score, f.vector_rank, f.keyword_rank FROM fused f '
    'ORDER BY f.score DESC, f.vector_rank NULLS LAST, f.keyword_rank NULLS LAST, f.id LIMIT $8) '
    'SELECT c.id, c.document_id, d.filename, d.content_type, c.chunk_index, c.content, c.metadata, '
    'd.metadata AS document_metadata, '
    'CASE WHEN jsonb_typeof(c.metadata -> ''page'') = ''number'' THEN (c.metadata ->> ''page'')::numeric::integer END AS page, '
    'CASE WHEN jsonb_typeof(c.metadata -> ''headings'') = ''array'' '
    'THEN ARRAY(SELECT jsonb_array_elements_text(c.metadata -> ''headings'')) ELSE ''{}''::text[] END AS headings, '
    'CASE WHEN jsonb_typeof(c.metadata #> ''{span,0}'') = ''number'' AND jsonb_typeof(c.metadata #> ''{span,1}'') = ''number'' '
    'THEN ARRAY[(c.metadata #>> ''{span,0}'')::numeric::bigint, (c.metadata #>> ''{span,1}'')::numeric::bigint] END AS span, '
    'f.score::double precision, f.vector_rank::integer, f.keyword_rank::integer '
    'FROM top f JOIN upload_pipeline.document_chunks c ON c.id = f.id '
    'JOIN upload_pipeline.documents d ON d.id = c.document_id '
    'ORDER BY f.score DESC, f.vector_rank NULLS LAST, f.keyword_rank NULLS LAST, f.id',
    concat_ws(' ',
      CASE WHEN p_mode IN ('vector', 'hybrid') THEN format(
        'vec AS MATERIALIZED (%s), '
        'vec_ranked AS (SELECT v.id, v.distance, row_number() OVER (ORDER BY v.distance, v.id) AS r FROM vec v),',
        upload_pipeline.vector_list_sql(p_model, p_dimensions, p_exact, CASE WHEN p_filtered THEN '$3' END,
                                        NULL, '$4', p_tenant)) END,
      CASE WHEN p_mode IN ('keyword', 'hybrid') THEN format(
        'kw AS MATERIALIZED (%1$s), '
        'kw_ranked AS (SELECT k.id, k.rank, %2$s row_number() OVER (ORDER BY k.rank DESC, k.id) AS r FROM kw k),',
        CASE
          WHEN p_list IN ('identifier', 'sentence') THEN
            format('SELECT k.id, k.rank, k.boosted FROM upload_pipeline.identifier_candidates($2, %s, $4) k',
                   CASE WHEN p_filtered THEN '$3' ELSE 'NULL' END)
          WHEN p_list = 'none' THEN 'SELECT NULL::uuid AS id, NULL::real AS rank WHERE false'
          ELSE format('SELECT k.id, k.rank FROM upload_pipeline.keyword_candidates($2, %s, $4) k',
                      CASE WHEN p_filtered THEN '$3' ELSE 'NULL' END) END,
        CASE WHEN p_list = 'identifier' THEN 'k.boosted,' ELSE '' END) END),
    CASE p_mode
      WHEN 'vector' THEN
        'SELECT v.id, 1 - v.distance AS score, v.r AS vector_rank, NULL::bigint AS keyword_rank FROM vec_ranked v'
      WHEN 'keyword' THEN
        'SELECT k.id, k.rank AS score, NULL::bigint AS vector_rank, k.r AS keyword_rank FROM kw_ranked k'
      ELSE
        'SELECT coalesce(v.id, k.id) AS id, '
        'coalesce($6 / ($5 + v.r), 0) + coalesce(' ||
        CASE WHEN p_list = 'identifier' THEN 'CASE WHEN k.boosted THEN $7 * $9 ELSE $7 END' ELSE '$7' END ||
        ' / ($5 + k.r), 0) AS score, v.r AS vector_rank, k.r AS keyword_rank '
        'FROM vec_ranked v FULL JOIN kw_ranked k ON k.id = v.id'
    END)
$$;

-- The query without a tenant's own index, as before (tests EXPLAIN it by this signature).
CREATE OR REPLACE FUNCTION upload_pipeline.search_chunks_sql(
  p_mode text, p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean, p_list text)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT upload_pipeline.search_chunks_sql(p_mode, p_model, p_dimensions, p_filtered, p_exact, p_list, NULL)
$$;

-- match_chunks' query (20261202000001_tenant_search.sql), walking the caller's own index when `p_tenant` names it.
CREATE FUNCTION upload_pipeline.match_chunks_sql(
  p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean, p_tenant uuid)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'WITH near AS MATERIALIZED (%s) '
    'SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, 1 - n.distance AS similarity '
    'FROM near n JOIN upload_pipeline.document_chunks c ON c.id = n.id ORDER BY n.distance, n.id',
    upload_pipeline.vector_list_sql(p_model, p_dimensions, p_exact, NULL,
      CASE WHEN p_filtered THEN 'c.metadata @> $2' END, '$3', p_tenant))
$$;

CREATE OR REPLACE FUNCTION upload_pipeline.match_chunks_sql(
  p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT upload_pipeline.match_chunks_sql(p_model, p_dimensions, p_filtered, p_exact, NULL)
$$;

-- search_chunks, as in 20261204000000_sentence_keywords.sql, but for the graph it walks: the caller's own when
-- built (tenant_index_ready), else the model's. The same signature, arguments, checks and results; the same
-- promises (the best match_count chunks of the caller's ready documents, under row-level security, among the
-- documents the filter lets through).
CREATE OR REPLACE FUNCTION upload_pipeline.search_chunks(
  query_text text,
  query_embedding vector,
  match_count integer DEFAULT 10,
  filter jsonb DEFAULT '{}',
  mode text DEFAULT 'hybrid',
  candidates integer DEFAULT 40,
  rrf_k integer DEFAULT 60,
  vector_weight double precision DEFAULT 1,
  keyword_weight double precision DEFAULT 1,
  embedding_model text DEFAULT NULL)
RETURNS TABLE (
  id uuid, document_id uuid, filename text, content_type text, chunk_index integer, content text, metadata jsonb,
  document_metadata jsonb, page integer, headings text[], span bigint[], score double precision,
  vector_rank integer, keyword_rank integer)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 100
SET hnsw.max_scan_tuples = 200000
SET hnsw.scan_mem_multiplier = 10
SET jit = off
AS $$
DECLARE
  v_filter     jsonb := nullif(coalesce(search_chunks.filter, '{}'), '{}');
  v_model      text := search_chunks.embedding_model;
  v_dims       integer;
  v_query      tsquery;
  v_list       text := 'keyword';
  v_identifier boolean;
  v_terms      integer;
  v_pool       integer;
  v_docs       uuid[];
  v_exact      boolean;
  v_tenant     uuid;
  v_scan       text := current_setting('enable_seqscan');
  v_sort       text := current_setting('enable_sort');
BEGIN
  PERFORM upload_pipeline.search_check(search_chunks.match_count, search_chunks.mode, search_chunks.candidates,
    search_chunks.rrf_k, search_chunks.vector_weight, search_chunks.keyword_weight);
  PERFORM upload_pipeline.filter_validate(v_filter);
  IF search_chunks.mode <> 'keyword' THEN
    IF query_embedding IS NULL THEN
      RAISE EXCEPTION 'query_embedding is required in % mode', search_chunks.mode
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_dims := vector_dims(query_embedding);
    SELECT m.model INTO v_model FROM upload_pipeline.embedding_models m
    WHERE m.dimensions = v_dims AND (v_model IS NULL OR m.model = v_model)
    ORDER BY m.created_at DESC LIMIT 1;
    IF v_model IS NULL THEN
      RAISE EXCEPTION 'no embedding model of % dimensions is registered%', v_dims,
        coalesce(' under the name ' || quote_literal(search_chunks.embedding_model), '')
        USING ERRCODE = 'invalid_parameter_value';
    END IF;
  END IF;
  IF search_chunks.mode <> 'vector' THEN
    IF coalesce(btrim(query_text), '') = '' THEN
      RAISE EXCEPTION 'query_text is required in % mode', search_chunks.mode USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_query := websearch_to_tsquery(upload_pipeline.text_search_config(), query_text);
    -- The cheap tests first: query_terms reads the query character by character, so only queries of at most 64
    -- nodes (about 32 words) and identifier-like ones get it; longer ones keep the list before.
    v_identifier := upload_pipeline.identifier_query(query_text);
    IF v_identifier OR numnode(v_query) <= 64 THEN
      v_terms := cardinality((upload_pipeline.query_terms(upload_pipeline.strip_double_negation(v_query))).terms);
      -- No term: every top-level alternative starts with an exclusion (`-draft lamp or -memo storm`, which
      -- query_terms reads as negated) or there is nothing to look for; keyword_candidates' list, or none below.
      v_list := CASE
        WHEN v_terms = 0 THEN 'keyword'
        WHEN v_identifier AND v_terms <= 8 THEN 'identifier'
        WHEN v_terms <= upload_pipeline.sentence_terms() THEN 'sentence'
        ELSE 'keyword' END;
    END IF;
    -- keyword_candidates' list needs an indexable query; identifier_candidates' copes without one (`a or -b`
    -- lists the chunks holding `a`).
    IF v_list = 'keyword' AND querytree(upload_pipeline.strip_double_negation(v_query)) IN ('', 'T') THEN
      v_list := 'none';
    END IF;
    IF v_list = 'none' AND search_chunks.mode = 'keyword' THEN
      RETURN;
    END IF;
  END IF;
  -- The filter, once per document: the caller's ready documents that pass it (row-level security shows only the
  -- caller's). None: nothing to search.
  IF v_filter IS NOT NULL THEN
    v_filter := upload_pipeline.filter_prepare(v_filter);
    SELECT coalesce(array_agg(d.id), '{}') INTO v_docs FROM upload_pipeline.documents d
    WHERE d.status = 'ready' AND upload_pipeline.filter_matches(d, v_filter);
    IF cardinality(v_docs) = 0 THEN
      RETURN;
    END IF;
  END IF;
  IF search_chunks.mode <> 'keyword' THEN
    v_exact := upload_pipeline.caller_chunks(v_model, v_docs, upload_pipeline.exact_search_chunks() + 1)
               <= upload_pipeline.exact_search_chunks();
    -- The graph: the caller's own when built, else the model's (see the top).
    IF NOT v_exact AND upload_pipeline.tenant_index_ready(v_model) THEN
      v_tenant := upload_pipeline.current_user_id();
    END IF;
    -- One way to the vector list's order (see the top of 20261202000001_tenant_search.sql).
    PERFORM set_config(CASE WHEN v_exact THEN 'enable_seqscan' ELSE 'enable_sort' END, 'off', true);
  END IF;
  -- Each list holds at least the hits asked for, and the HNSW scan looks at least that wide.
  v_pool := greatest(search_chunks.candidates, search_chunks.match_count);
  PERFORM set_config('hnsw.ef_search', greatest(100, v_pool)::text, true);
  RETURN QUERY EXECUTE
    upload_pipeline.search_chunks_sql(search_chunks.mode, v_model, v_dims, v_filter IS NOT NULL,
                                      coalesce(v_exact, false), v_list, v_tenant)
    USING query_embedding, v_query, v_docs, v_pool, search_chunks.rrf_k, search_chunks.vector_weight,
          search_chunks.keyword_weight, search_chunks.match_count, upload_pipeline.identifier_boost();
  PERFORM set_config('enable_seqscan', v_scan, true), set_config('enable_sort', v_sort, true);
END
$$;

-- match_chunks, as in 20261202000001_tenant_search.sql, walking the caller's own index when built.
CREATE OR REPLACE FUNCTION upload_pipeline.match_chunks(
  query_embedding vector, match_count integer DEFAULT 10, filter jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, document_id uuid, chunk_index integer, content text, metadata jsonb, similarity double precision)
LANGUAGE plpgsql STABLE
SET hnsw.iterative_scan = 'relaxed_order'
SET hnsw.ef_search = 100
SET hnsw.max_scan_tuples = 200000
SET hnsw.scan_mem_multiplier = 10
SET jit = off
AS $$
DECLARE
  dims   integer := vector_dims(query_embedding);
  model  text := filter ->> 'embedding_model';
  rest   jsonb := coalesce(filter, '{}') - 'embedding_model';
  exact  boolean;
  tenant uuid;
  v_scan text := current_setting('enable_seqscan');
  v_sort text := current_setting('enable_sort');
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
  -- A metadata filter narrows the caller's chunks further; they are counted without it, so a selective filter of a
  -- large user's is served by the graph (search_chunks' filters, on documents, are counted exactly).
  exact := upload_pipeline.caller_chunks(model, NULL, upload_pipeline.exact_search_chunks() + 1)
           <= upload_pipeline.exact_search_chunks();
  IF NOT exact AND upload_pipeline.tenant_index_ready(model) THEN
    tenant := upload_pipeline.current_user_id();
  END IF;
  PERFORM set_config(CASE WHEN exact THEN 'enable_seqscan' ELSE 'enable_sort' END, 'off', true);
  RETURN QUERY EXECUTE upload_pipeline.match_chunks_sql(model, dims, rest <> '{}', exact, tenant)
    USING query_embedding, rest, match_count;
  PERFORM set_config('enable_seqscan', v_scan, true), set_config('enable_sort', v_sort, true);
END
$$;

REVOKE EXECUTE ON FUNCTION
  upload_pipeline.tenant_index_name(uuid, text),
  upload_pipeline.tenant_index_ready(text),
  upload_pipeline.tenant_index_plan(integer),
  upload_pipeline.vector_list_sql(text, integer, boolean, text, text, text, uuid),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean, text, uuid),
  upload_pipeline.match_chunks_sql(text, integer, boolean, boolean, uuid)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
  upload_pipeline.tenant_index_name(uuid, text),
  upload_pipeline.tenant_index_ready(text),
  upload_pipeline.vector_list_sql(text, integer, boolean, text, text, text, uuid),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean, text, uuid),
  upload_pipeline.match_chunks_sql(text, integer, boolean, boolean, uuid)
TO upload_pipeline_app;
