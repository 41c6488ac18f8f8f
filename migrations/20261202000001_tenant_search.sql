-- Tenant-correct vector search at any size (issue 20, item 4).
--
-- Every user's chunks are in one table and one HNSW index per model. Walking that graph for a user who owns a small
-- share of it, and keeping their rows (row-level security, ready documents, a filter) as the walk returns them,
-- finds too few of theirs or not their best: the walk meets thousands of other users' chunks first, and its
-- iterative scan gives up at hnsw.max_scan_tuples. So the vector list is taken one of two ways, chosen per search
-- by the number of chunks it looks among (the caller's, or those of the documents a filter let through):
--   exact : at most upload_pipeline.exact_search_chunks() chunks: every one read through an index of the
--           caller's (document_chunks_user_model: user_id, embedding_model, document_id), its distance computed,
--           the nearest kept. The true top k, at a cost that follows the caller's chunks, not the table's.
--   graph : more than that: the model's HNSW index, walked as before (iterative scan, relaxed order, the pool
--           ranked by exact distance). The caller owns enough of the graph for the walk to meet their rows early.
-- Each shape leaves the planner one way to run it, whatever it estimates (it sees the caller as the average user,
-- since current_user_id() is not a constant of the plan). The exact query orders the distances of a subquery that
-- may not be flattened (OFFSET 0), an order no index can give, and runs with sequential scans disabled, so the
-- caller's rows come from the btree. The graph query runs with sorts disabled, so the HNSW index is the only way to
-- its ORDER BY ... LIMIT, where the planner would otherwise sort a large user's chunks. The settings are the
-- statement's: the functions put the caller's back after it. search_chunks (the API and agents) and match_chunks
-- (agents) choose alike.
--
-- The limit: the graph walk reads about `candidates` / share rows for a caller owning `share` of the model's chunks,
-- the exact scan the caller's chunks, so the two cost the same at about sqrt(candidates x table) chunks (with 40
-- candidates, about 6,300 at a million): above that the exact scan is the slower, below it the walk, and the further
-- below, the more often the walk misses. The default, 5,000, is under that crossing, so a caller whose walk would be long is scanned exactly, and a caller above it owns at least
-- 0.5 % of a million-chunk graph, enough for the walk to meet their rows early. `make bench` (scenario `search`: 1,000,000 chunks across 1,000 users of 10 to 300,000 chunks)
-- measures recall@10 and p95 latency per size bucket (docs/benchmarks.md). `SET upload_pipeline.exact_search_chunks
-- = n` (for a session, or ALTER ROLE / ALTER DATABASE ... SET) moves it; 0 sends every search to the graph.

-- The exact scan reads every vector of the caller's. A vector is stored `external` (pgvector's default), so in a
-- row with a chunk's text (over 2 kB together) it went to the TOAST table, one more index lookup per chunk read;
-- `main` keeps it in the row and moves the text out instead, which only the hits' few rows are read for (a vector
-- too big for a page, over about 2,000 dimensions, still goes out of line; `main` also lets Postgres try to
-- compress it, which seldom pays for floats). Only the catalogue changes: rows written from now on are stored so,
-- older ones as they were until rewritten. It takes the table's exclusive lock for that moment.
ALTER TABLE upload_pipeline.document_chunks ALTER COLUMN embedding SET STORAGE MAIN;

-- The most chunks a search scans exactly (see above).
-- A value that is not a whole number of at most 9 digits is the default's, not an error in every search.
CREATE FUNCTION upload_pipeline.exact_search_chunks() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN s ~ '^\s*[0-9]{1,9}\s*$' THEN btrim(s)::integer ELSE 5000 END
  FROM (SELECT coalesce(current_setting('upload_pipeline.exact_search_chunks', true), '') AS s) v
$$;

-- The caller's chunks of `p_model` (row-level security), of the documents `p_documents` (NULL: all), counted up
-- to `p_limit` at most: an index-only scan of document_chunks_user_model that stops there, whatever the planner
-- estimates the caller's chunks to be (sequential scans off). What decides a search's vector list.
CREATE FUNCTION upload_pipeline.caller_chunks(p_model text, p_documents uuid[], p_limit integer) RETURNS integer
LANGUAGE plpgsql STABLE
SET enable_seqscan = off
AS $$
DECLARE
  v_count integer;
BEGIN
  -- Two statements rather than `p_documents IS NULL OR ...`, which a generic plan could not use as an index bound.
  IF p_documents IS NULL THEN
    SELECT count(*) INTO v_count FROM (
      SELECT 1 FROM upload_pipeline.document_chunks c
      WHERE c.user_id = upload_pipeline.current_user_id() AND c.embedding_model = p_model
      LIMIT p_limit) s;
  ELSE
    SELECT count(*) INTO v_count FROM (
      SELECT 1 FROM upload_pipeline.document_chunks c
      WHERE c.user_id = upload_pipeline.current_user_id() AND c.embedding_model = p_model
        AND c.document_id = ANY (p_documents)
      LIMIT p_limit) s;
  END IF;
  RETURN v_count;
END
$$;

-- The vector list: the ids of the `$4` chunks nearest the query vector `$1`, with their cosine distance, among the
-- caller's chunks of `p_model` in ready documents (`p_documents` NULL), or among the chunks of the documents in
-- the uuid[] `p_documents` names (search_chunks' `$3`: the caller's ready documents that passed its filter), and
-- that pass `p_condition` (a condition on `c`, or NULL). `p_exact`: by the exact scan, else by the HNSW graph.
-- `p_count`: the parameter that holds the count (search_chunks' `$4`).
CREATE FUNCTION upload_pipeline.vector_list_sql(
  p_model text, p_dimensions integer, p_exact boolean, p_documents text, p_condition text, p_count text)
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
    -- The caller's rows, which row-level security keeps anyway, named so that the exact scan reads them through
    -- document_chunks_user_model.
    CASE WHEN p_exact THEN 'AND c.user_id = upload_pipeline.current_user_id() ' ELSE '' END
    || CASE WHEN p_condition IS NOT NULL THEN format('AND %s ', p_condition) ELSE '' END,
    p_count)
$$;

-- search_chunks' query (as in 20261201000001_hybrid_search.sql), its vector list now from vector_list_sql: the exact
-- scan (`p_exact`), else the graph.
DROP FUNCTION upload_pipeline.search_chunks_sql(text, text, integer, boolean);
CREATE FUNCTION upload_pipeline.search_chunks_sql(
  p_mode text, p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean)
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
                                        NULL, '$4')) END,
      CASE WHEN p_mode IN ('keyword', 'hybrid') THEN format(
        'kw AS MATERIALIZED (SELECT k.id, k.rank FROM upload_pipeline.keyword_candidates($2, %1$s, $4) k), '
        'kw_ranked AS (SELECT k.id, k.rank, row_number() OVER (ORDER BY k.rank DESC, k.id) AS r FROM kw k),',
        CASE WHEN p_filtered THEN '$3' ELSE 'NULL' END) END),
    CASE p_mode
      WHEN 'vector' THEN
        'SELECT v.id, 1 - v.distance AS score, v.r AS vector_rank, NULL::bigint AS keyword_rank FROM vec_ranked v'
      WHEN 'keyword' THEN
        'SELECT k.id, k.rank AS score, NULL::bigint AS vector_rank, k.r AS keyword_rank FROM kw_ranked k'
      ELSE
        'SELECT coalesce(v.id, k.id) AS id, '
        'coalesce($6 / ($5 + v.r), 0) + coalesce($7 / ($5 + k.r), 0) AS score, v.r AS vector_rank, k.r AS keyword_rank '
        'FROM vec_ranked v FULL JOIN kw_ranked k ON k.id = v.id'
    END)
$$;

-- search_chunks, as before, but for the choice of its vector list's shape (see the top). Unchanged: its
-- signature, arguments, checks, results, and what it promises (the best match_count chunks of the caller's ready
-- documents, under row-level security).
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
  v_filter jsonb := nullif(coalesce(search_chunks.filter, '{}'), '{}');
  v_model  text := search_chunks.embedding_model;
  v_dims   integer;
  v_query  tsquery;
  v_pool   integer;
  v_docs   uuid[];
  v_exact  boolean;
  v_scan   text := current_setting('enable_seqscan');
  v_sort   text := current_setting('enable_sort');
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
    -- One way to the vector list's order (see the top of 20261202000001_tenant_search.sql).
    PERFORM set_config(CASE WHEN v_exact THEN 'enable_seqscan' ELSE 'enable_sort' END, 'off', true);
  END IF;
  -- Each list holds at least the hits asked for, and the HNSW scan looks at least that wide.
  v_pool := greatest(search_chunks.candidates, search_chunks.match_count);
  PERFORM set_config('hnsw.ef_search', greatest(100, v_pool)::text, true);
  RETURN QUERY EXECUTE
    upload_pipeline.search_chunks_sql(search_chunks.mode, v_model, v_dims, v_filter IS NOT NULL,
                                      coalesce(v_exact, false))
    USING query_embedding, v_query, v_docs, v_pool, search_chunks.rrf_k, search_chunks.vector_weight,
          search_chunks.keyword_weight, search_chunks.match_count;
  PERFORM set_config('enable_seqscan', v_scan, true), set_config('enable_sort', v_sort, true);
END
$$;

-- match_chunks' query: $1 query vector, $2 metadata filter (when `p_filtered`), $3 count; its nearest chunks from
-- vector_list_sql, exactly when `p_exact`, else by the graph.
DROP FUNCTION upload_pipeline.match_chunks_sql(text, integer, boolean);
CREATE FUNCTION upload_pipeline.match_chunks_sql(
  p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT format(
    'WITH near AS MATERIALIZED (%s) '
    'SELECT c.id, c.document_id, c.chunk_index, c.content, c.metadata, 1 - n.distance AS similarity '
    'FROM near n JOIN upload_pipeline.document_chunks c ON c.id = n.id ORDER BY n.distance, n.id',
    upload_pipeline.vector_list_sql(p_model, p_dimensions, p_exact, NULL,
      CASE WHEN p_filtered THEN 'c.metadata @> $2' END, '$3'))
$$;

-- match_chunks, as before (over ready documents, halfvec models), choosing its shape as search_chunks does.
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
  PERFORM set_config(CASE WHEN exact THEN 'enable_seqscan' ELSE 'enable_sort' END, 'off', true);
  RETURN QUERY EXECUTE upload_pipeline.match_chunks_sql(model, dims, rest <> '{}', exact)
    USING query_embedding, rest, match_count;
  PERFORM set_config('enable_seqscan', v_scan, true), set_config('enable_sort', v_sort, true);
END
$$;

REVOKE EXECUTE ON FUNCTION
  upload_pipeline.exact_search_chunks(),
  upload_pipeline.caller_chunks(text, uuid[], integer),
  upload_pipeline.vector_list_sql(text, integer, boolean, text, text, text),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean),
  upload_pipeline.match_chunks_sql(text, integer, boolean, boolean)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
  upload_pipeline.exact_search_chunks(),
  upload_pipeline.caller_chunks(text, uuid[], integer),
  upload_pipeline.vector_list_sql(text, integer, boolean, text, text, text),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean),
  upload_pipeline.match_chunks_sql(text, integer, boolean, boolean)
TO upload_pipeline_app;
