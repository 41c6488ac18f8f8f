-- A large tenant's common words are not counted (issue 20, item 4: hybrid search p95 within 30 ms at any size).
--
-- identifier_candidates counts each term's chunks among the caller's, up to 1,001 (20261203000000_keyword_ranking.sql:
-- a term in more is common, its frequency taken as 1,001). The count stops at 1,001 rows, but the GIN index answers
-- it with a bitmap of every chunk of the caller's holding the word, built from the caller's posting list and the
-- word's: for a word in a tenth of a 300,000-chunk tenant's chunks that is 30,000 entries a term, up to 16 terms a
-- sentence (`make bench`, scenario `search`: hybrid p95 148 ms for that tenant, vector 27 ms).
--
-- Now a term is taken as common without counting when the table's statistics say it certainly is: the caller's
-- estimated chunks (their share of chunk_keywords' rows among the user_id column's most common values, times the
-- table's rows) times the word's frequency (the tsv column's most common elements) is above 4 x 1,001, for a
-- single word only (a phrase's or an identifier's words being common says nothing of how rare it is). Its gate is replaced by NULL, which identifier_candidates_sql takes
-- as "more than 1,001" (as before for a term the index cannot look up). Only the largest tenants (those in the
-- most common values) and the commonest words (those in the most common elements) are affected; the counts of
-- everyone else, and of every search with a filter (a share of the caller's documents), are taken as before. The
-- price: a word common in the table but rare in this tenant's chunks (four times rarer than everywhere else) is
-- taken as common there, and weighs less in its BM25 ranking. Statistics come from ANALYZE (autovacuum); without
-- them every term is counted, as before.

-- query_terms' gates, those of the single-word terms certainly common among the caller's chunks NULL (see above).
-- A phrase's or an identifier's gate (its words, `a & b`) is kept: its words' frequencies bound its own from
-- above, not from below, and an identifier made of common words is what the BM25 list is for. Among `p_documents`
-- (a filter): the gates unchanged. The statistics are read once a call.
CREATE FUNCTION upload_pipeline.uncounted_gates(p_gates tsquery[], p_documents uuid[]) RETURNS tsquery[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
  -- PL/pgSQL, whose plans are kept for the session: planning this query over the pg_stats view takes longer than
  -- running it.
  RETURN (
  WITH caller AS MATERIALIZED (
    SELECT CASE WHEN p_documents IS NULL THEN
      (SELECT greatest(c.reltuples, 0) FROM pg_catalog.pg_class c
       WHERE c.oid = 'upload_pipeline.chunk_keywords'::regclass)
      * coalesce((SELECT s.most_common_freqs[array_position(s.most_common_vals::text::uuid[],
                                                            upload_pipeline.current_user_id())]
                  FROM pg_catalog.pg_stats s
                  WHERE s.schemaname = 'upload_pipeline' AND s.tablename = 'chunk_keywords'
                    AND s.attname = 'user_id'), 0)
      ELSE 0 END AS chunks),
  words AS MATERIALIZED (
    SELECT e.word, e.freq
    FROM caller c CROSS JOIN pg_catalog.pg_stats s
    CROSS JOIN LATERAL unnest(s.most_common_elems::text::text[], s.most_common_elem_freqs) AS e (word, freq)
    WHERE c.chunks > 4004
      AND s.schemaname = 'upload_pipeline' AND s.tablename = 'chunk_keywords' AND s.attname = 'tsv'),
  single AS (
    SELECT g.i, g.gate, replace((regexp_match(g.gate::text, '^''((?:[^'']|'''')*)''$'))[1], '''''', '''') AS word
    FROM unnest(p_gates) WITH ORDINALITY g (gate, i))
  SELECT coalesce(array_agg(
    CASE WHEN g.word IS NOT NULL AND c.chunks * coalesce(w.freq, 0) > 4004 THEN NULL ELSE g.gate END
    ORDER BY g.i), '{}')
  FROM single g CROSS JOIN caller c LEFT JOIN words w ON w.word = g.word);
END
$$;

-- identifier_candidates, as in 20261203000000_keyword_ranking.sql, its gates through uncounted_gates.
CREATE OR REPLACE FUNCTION upload_pipeline.identifier_candidates(p_query tsquery, p_documents uuid[], p_limit integer)
RETURNS TABLE (id uuid, rank double precision, boosted boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline
SET enable_seqscan = off
AS $$
DECLARE
  v_query tsquery := upload_pipeline.strip_double_negation(p_query);
  v       record;
BEGIN
  SELECT * INTO v FROM upload_pipeline.query_terms(v_query);
  IF cardinality(v.terms) = 0 OR p_limit IS NULL OR p_limit < 1 THEN
    RETURN;
  END IF;
  RETURN QUERY EXECUTE upload_pipeline.identifier_candidates_sql()
    USING v_query, v.terms, upload_pipeline.uncounted_gates(v.gates, p_documents), p_documents, p_limit, v.pools,
          v.gate, v.recheck, v.operands;
END
$$;

-- The app role may call it: identifier_candidates may be owned by a role that is not the migrating one (see
-- 20261201000001_hybrid_search.sql), and pg_stats shows a role only the statistics of columns it may read (the
-- app role reads none of chunk_keywords: the gates come back unchanged).
REVOKE EXECUTE ON FUNCTION upload_pipeline.uncounted_gates(tsquery[], uuid[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.uncounted_gates(tsquery[], uuid[]) TO upload_pipeline_app;
