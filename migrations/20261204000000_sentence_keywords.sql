-- Sentences and questions get the BM25 keyword list too (issue 20, item 10: measure quality).
--
-- Until now only identifier-like queries (20261203000000_keyword_ranking.sql) had their keyword list ranked by
-- BM25, the chunks holding every word first and then those holding some of the rarer words; every other query
-- kept keyword_candidates' list: every word required, ranked by ts_rank_cd. A question's words seldom all meet in
-- one chunk, so that list was short or empty, and when it held one chunk that chunk took the keyword list's first
-- place whatever it was worth: on the evaluation set (tests/fixtures/eval), "What do the two cost numbers shown in
-- parentheses on each node of a query plan mean?" has one chunk holding all its words, on the EXPLAIN command's
-- page, and hybrid search put it above the page about reading plans, which vector search alone ranked first.
--
-- Now a query of at most 16 terms (query_terms: about 15 words and their side-by-side phrase; sentence_terms(),
-- below, is a setting) that is not identifier-like takes identifier_candidates' list as well, at keyword_weight
-- in the fusion (not boosted: a sentence's words are not what it is about, as an identifier's are). Measured on
-- the evaluation set through the API (MRR@10 by page, local all-MiniLM-L6-v2), against the list before:
--   hybrid  : paraphrases 0.658 -> 0.707 (vector alone 0.676), mixed 0.788 -> 0.795, keyword questions 0.975
--             (identifier-like, unchanged);
--   keyword : paraphrases 0.000 -> 0.650, mixed 0.150 -> 0.734.
-- Adding the vector list's candidates to the chunks scored (BM25 over them too) moved nothing on that set, and is
-- not done. The price is identifier_candidates' per term: each term's count returns at most 1,001 rows, but the
-- GIN index answers it with a bitmap of every chunk of the caller's holding the term, so a common word costs more
-- the more chunks the caller has. Measured (`make bench`, scenario `search`, 1,000,000 chunks): hybrid search of
-- an 8-15 word sentence at p50 9.8 ms for tenants of 10-99 chunks and 82.5 ms for one of 300,000 (vector alone
-- 7.4 ms). `upload_pipeline.sentence_terms = 0` (ALTER DATABASE ... SET, or ALTER ROLE for the role the API logs in
-- as: the app role is only SET LOCAL, so its own settings do not apply) gives sentences the list before.
-- Longer queries, and those of more than 64 tsquery nodes (not read term by term), keep the list before. A query
-- without a positive term gets no keyword list, as before; one whose every alternative starts with an exclusion
-- gets keyword_candidates' (as before for a sentence; an identifier-like one got none).
--
-- Keyword mode changes with it: a sentence's chunks holding every word come first (rank above 0.5, as for an
-- identifier-like query), then those holding some of its words; before, only the former were listed.

-- The most terms a sentence's keyword list is BM25's for: the session's (or role's, or database's)
-- `upload_pipeline.sentence_terms`, else 16. 0 gives every sentence the list before (keyword_candidates'): cheaper for
-- a tenant of many chunks, whose common words make each term's count dearer (`make bench`, scenario `search`). A
-- value that is not a whole number of at most 2 digits is the default's, not an error in every search.
CREATE FUNCTION upload_pipeline.sentence_terms() RETURNS integer
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN s ~ '^\s*[0-9]{1,2}\s*$' THEN btrim(s)::integer ELSE 16 END
  FROM (SELECT coalesce(current_setting('upload_pipeline.sentence_terms', true), '') AS s) v
$$;
REVOKE EXECUTE ON FUNCTION upload_pipeline.sentence_terms() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.sentence_terms() TO upload_pipeline_app;

-- search_chunks' query, as in 20261203000000_keyword_ranking.sql, with one more keyword list: 'sentence',
-- identifier_candidates' list weighing keyword_weight in the fusion whether its rows are `boosted` or not.
CREATE OR REPLACE FUNCTION upload_pipeline.search_chunks_sql(
  p_mode text, p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean, p_list text)
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

-- search_chunks, as in 20261203000000_keyword_ranking.sql but for the choice of the keyword list (see the top):
-- 'identifier' for an identifier-like query of at most 8 terms (boosted), 'sentence' for any other of at most 16
-- (identifier_candidates' list, at keyword_weight), 'keyword' (keyword_candidates' list) beyond, 'none' without a
-- positive term. The same signature, arguments, checks and results; the same promises (the best match_count
-- chunks of the caller's ready documents, under row-level security, among the documents the filter lets through).
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
    -- One way to the vector list's order (see the top of 20261202000001_tenant_search.sql).
    PERFORM set_config(CASE WHEN v_exact THEN 'enable_seqscan' ELSE 'enable_sort' END, 'off', true);
  END IF;
  -- Each list holds at least the hits asked for, and the HNSW scan looks at least that wide.
  v_pool := greatest(search_chunks.candidates, search_chunks.match_count);
  PERFORM set_config('hnsw.ef_search', greatest(100, v_pool)::text, true);
  RETURN QUERY EXECUTE
    upload_pipeline.search_chunks_sql(search_chunks.mode, v_model, v_dims, v_filter IS NOT NULL,
                                      coalesce(v_exact, false), v_list)
    USING query_embedding, v_query, v_docs, v_pool, search_chunks.rrf_k, search_chunks.vector_weight,
          search_chunks.keyword_weight, search_chunks.match_count, upload_pipeline.identifier_boost();
  PERFORM set_config('enable_seqscan', v_scan, true), set_config('enable_sort', v_sort, true);
END
$$;
