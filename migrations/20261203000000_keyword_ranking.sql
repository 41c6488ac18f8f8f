-- Identifier-like queries get a keyword list of their own (issue 20, item 10: measure quality).
--
-- Why: on the evaluation set (tests/fixtures/eval) hybrid search missed its target on the keyword questions
-- (identifiers, SQLSTATEs, flags, quoted messages), for three reasons the keyword list gave it:
--   * ts_rank_cd counts occurrences, with no notion of how rare a word is nor of how long the chunk is: the page
--     that defines max_wal_senders (once) ranked below pages that mention it in passing (twice);
--   * websearch_to_tsquery wants every word in one chunk: `SQLSTATE 40P01` found nothing on the appendix page
--     whose table row holds 40P01 without the word SQLSTATE;
--   * at weight 1 the keyword list, right about an identifier, is outvoted by the vector list, which blurs it.
-- So a query read as identifiers (identifier_query: EVERY query of at most 4 words, whatever they are, and a query
-- of 5 to 8 words when one of them looks like an identifier) that has a positive term takes another list,
-- identifier_candidates: the chunks matching the whole query first, then those holding some of its terms (a chunk
-- of neither tier is not listed; `-word` still excludes), each tier ranked by BM25 (k1 1.2, b 0.75), and weighs
-- identifier_boost() times keyword_weight in the fusion. Every other query (a sentence, a question) is ranked as
-- before: same list, same weights. A query without a positive term (`-draft`, stop words) gets no keyword list.
--
-- BM25's statistics are estimates, computed at query time with no statistics table to keep, each at a cost
-- bounded by constants (see identifier_candidates_sql; C = 1,000, P = 8 x candidates and at most C):
--   * a term's document frequency: the caller's chunks holding it, counted up to C + 1; above C the term is
--     common and its frequency taken as C + 1 (its IDF is low anyway, so the estimate barely moves the ranking).
--     A phrase is counted exactly when its words are all together in at most P chunks, else by those (an upper
--     bound);
--   * the number of chunks: the chunks_total of the ready ones among the caller's 1,000 newest documents (a lower bound
--     beyond), and at least any term's frequency;
--   * the average length: the average number of distinct words of the chunks scored.
-- A term is an operand of the query's top level (`|` if there is one, else `&`): a word, or a phrase (an
-- identifier such as max_wal_senders is the phrase max <-> wal <-> sender, counted as one term, not as three
-- common words); with several, all of them side by side are one more term (query_terms). A term's frequency in a
-- chunk is ts_rank_cd's count of its covers with every weight 1. No chunk row and no index changes.
--
-- Cost, whatever the size of the caller's part of the table: at most C + 1 rows of chunk_keywords read to count a
-- term (no chunk's words read: the count uses a query the index answers without a recheck; a phrase's exact count
-- checks the words of at most P chunks); at most P chunks matching the whole query; only when those are fewer than
-- the candidates asked for, at most P more holding a term of at most C chunks, the rarest term first (a common term
-- adds none); and those chunks scored, each read once by primary key. When every term is common, the list is the
-- list before (ts_rank_cd, every word required) over at most P matches, and not boosted. The index itself still
-- walks the caller's posting lists of the query's words, as keyword_candidates does. The price: among more than P
-- chunks matching the whole query, the P scored are the first the index returns, not the best of them all.
--
-- Measured on a copy of the evaluation set (MRR@10 by page, hybrid, keyword questions), before the caps (exact
-- statistics, every chunk holding any word scored): 0.931 with the list before (0.943 with only the weight
-- raised), 0.975 with this list at identifier_boost 3 (2: 0.957; 5: 0.975); paraphrases and mixed questions, which
-- are sentences, unchanged. On that copy (944 chunks) no word can reach the cap; what differs from the version
-- measured is the pool (320 chunks at most per tier), the average length (the pool's) and a phrase whose words are
-- together in more than 320 chunks. Not measured again with the caps: `make bench-quality` measures it end to end.
-- On a tenant of 12,000 chunks all holding `database`, that query reads 1,001 rows of chunk_keywords to count the
-- word and 320 to list and score its chunks, where the list without caps read and scored all 12,000
-- (identifiers.rs: a_common_word_reads_at_most_the_caps_worth_of_rows_whatever_the_tenants_size).

-- The keyword list's weight for identifier-like queries, as a multiple of keyword_weight: the session's (or
-- transaction's) `upload_pipeline.identifier_boost` (the API sets `search.identifier_boost` for each search), else
-- 3. A value that is not a number from 1 to 20 is the default's, not an error in every search.
CREATE FUNCTION upload_pipeline.identifier_boost() RETURNS double precision
LANGUAGE sql STABLE PARALLEL SAFE AS $$
  SELECT CASE WHEN v BETWEEN 1 AND 20 THEN v ELSE 3 END
  FROM (SELECT CASE WHEN s ~ '^\s*[0-9]{1,2}(\.[0-9]+)?\s*$' THEN btrim(s)::double precision END AS v
        FROM (SELECT coalesce(current_setting('upload_pipeline.identifier_boost', true), '') AS s) g) b
$$;

-- Whether a query is read as identifiers rather than as a sentence: every query of 1 to 4 words, whatever they are
-- (`spring tides` is), and a query of 5 to 8 words of which one looks like an identifier: `_`, `--`, a double quote, `\`, `=`, a dot between letters or digits
-- (postgresql.conf), `(` right after one (date_bin(...)), letters and digits mixed (40P01, sha256), camelCase, or
-- an upper-case word (VACUUM, PGSSLMODE). A quoted phrase counts as one word. Questions and sentences are longer.
CREATE FUNCTION upload_pipeline.identifier_query(p_text text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
  SELECT coalesce(u.n BETWEEN 1 AND 8 AND (
    u.n <= 4
    OR p_text ~ '[_"\\=]|--|[[:alnum:]]\.[[:alnum:]]|[[:alnum:]]\(|[[:alpha:]][[:digit:]]|[[:digit:]][[:alpha:]]'
    OR p_text ~ '[[:lower:]][[:upper:]]|(^|[^[:alnum:]])[[:upper:]]{2,}([^[:alnum:]]|$)'), false)
  FROM (SELECT count(*) AS n FROM regexp_matches(coalesce(p_text, ''), '"[^"]*"?|[^[:space:]"]+', 'g') m) u
$$;

-- `p_query` without double negations: websearch_to_tsquery reads `--no-owner` as !!( 'no-own' <2> 'owner' ), which
-- matches what ( 'no-own' <2> 'owner' ) matches; but under a NOT the GIN index has no entry to start from and
-- walks every entry of the caller's. Each `!!` outside a quoted lexeme is dropped (`!!!x` keeps one `!`).
CREATE FUNCTION upload_pipeline.strip_double_negation(p_query tsquery) RETURNS tsquery
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT coalesce(string_agg(m.t[1], '' ORDER BY m.i) FILTER (WHERE m.t[1] <> '!!'), '')::tsquery
  FROM regexp_matches(p_query::text, $re$('(?:[^']|'')*'|!!|[^'!]+|!)$re$, 'g') WITH ORDINALITY m (t, i)
$$;

-- A query the GIN index serves without a recheck of the row, matching at least every chunk `p_query` matches: its
-- indexable part (querytree: negations dropped) with every phrase operator (<->, <N>) read as `&`. NULL when the
-- query has no indexable part (`-draft`, `a or -b`: a match without any word of the query). Counting or listing by
-- it reads only the rows it returns, never a chunk's words (websearch_to_tsquery makes no weights nor prefixes,
-- which would need the recheck).
CREATE FUNCTION upload_pipeline.tsquery_gate(p_query tsquery) RETURNS tsquery
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT CASE WHEN g.q IS NULL OR g.q IN ('', 'T') THEN NULL ELSE (
    SELECT string_agg(CASE WHEN m.t[1] ~ '^<(-|[0-9]+)>$' THEN '&' ELSE m.t[1] END, '' ORDER BY m.i)
    FROM regexp_matches(g.q, $re$('(?:[^']|'')*'|<(?:-|[0-9]+)>|[^'<]+|<)$re$, 'g') WITH ORDINALITY m (t, i))::tsquery
  END
  FROM (SELECT querytree(p_query) AS q) g
$$;

-- The operands of a tsquery's top level, as text: split at `p_operator` (`&` or `|`) outside parentheses and
-- quoted lexemes. websearch_to_tsquery('pg_terminate_backend(pid, timeout)') is 'pg' <-> 'termin' <-> 'backend' &
-- 'pid' & 'timeout': split at `&`, three operands, the first a phrase. `&` binds tighter than `|` (and phrase
-- operators tighter than `&`): `b or c -d` is 'b' | 'c' & !'d', whose top level is `|`, operands 'b' and 'c' & !'d'.
CREATE FUNCTION upload_pipeline.query_operands(p_query tsquery, p_operator text) RETURNS SETOF text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
  v_text  text := p_query::text;
  v_len   integer := length(p_query::text);
  v_depth integer := 0;
  v_quote boolean := false;
  v_start integer := 1;
  v_i     integer := 1;
  v_c     text;
BEGIN
  WHILE v_i <= v_len LOOP
    v_c := substr(v_text, v_i, 1);
    IF v_quote THEN
      -- Inside a lexeme, tsquery's text doubles a quote and escapes a backslash.
      IF v_c = '''' AND substr(v_text, v_i + 1, 1) = '''' THEN
        v_i := v_i + 1;
      ELSIF v_c = '''' THEN
        v_quote := false;
      ELSIF v_c = '\' THEN
        v_i := v_i + 1;
      END IF;
    ELSIF v_c = '''' THEN
      v_quote := true;
    ELSIF v_c = '(' THEN
      v_depth := v_depth + 1;
    ELSIF v_c = ')' THEN
      v_depth := v_depth - 1;
    ELSIF v_depth = 0 AND v_c = p_operator THEN
      RETURN NEXT btrim(substr(v_text, v_start, v_i - v_start));
      v_start := v_i + 1;
    END IF;
    v_i := v_i + 1;
  END LOOP;
  IF btrim(substr(v_text, v_start)) <> '' THEN
    RETURN NEXT btrim(substr(v_text, v_start));
  END IF;
END
$$;

-- What identifier_candidates needs of a query (pass it through strip_double_negation first):
--   terms    : the top level's operands but the negated ones, each once, in the query's order (the top level is
--              `|` when there is one, else `&`), and when there are several, all of them side by side in that order
--              (one more term, so that a chunk holding `quick brown fox` as written ranks above one holding the
--              three words apart: BM25 alone ignores where the words are, ts_rank_cd did not). Empty: the query
--              has no positive term (stop words, or exclusions only), and gets no keyword list;
--   gates    : each term's tsquery_gate, which its document frequency is counted by;
--   pools    : what a chunk must match to be listed for a term alone: the term, and, when the top level is `&`,
--              none of the negated operands (under `|`, `-word` is an alternative, not an exclusion);
--   operands : how many of the terms are operands (the last one, past them, is the side-by-side one);
--   gate     : tsquery_gate of the whole query (NULL: the query is not indexable, `a or -b`, and no chunk is
--              listed as holding every term); recheck: whether the query has phrase operators, which the index
--              cannot check alone (so its matches are looked for among the gate's).
CREATE FUNCTION upload_pipeline.query_terms(
  p_query tsquery, OUT terms tsquery[], OUT gates tsquery[], OUT pools tsquery[], OUT operands integer,
  OUT gate tsquery, OUT recheck boolean)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
  v_operator text := '|';
  v_operands text[];
  v_operand  text;
  v_not      tsquery;
  v_phrase   tsquery;
BEGIN
  terms := '{}';
  gates := '{}';
  pools := '{}';
  operands := 0;
  IF p_query IS NULL OR numnode(p_query) = 0 THEN
    RETURN;
  END IF;
  gate := upload_pipeline.tsquery_gate(p_query);
  -- A phrase anywhere, under a NOT too (querytree drops negations), makes the index's answers need a recheck.
  recheck := gate IS NOT NULL AND p_query::text ~ '<(-|[0-9]+)>';
  v_operands := ARRAY(SELECT upload_pipeline.query_operands(p_query, '|'));
  IF cardinality(v_operands) < 2 THEN
    v_operator := '&';
    v_operands := ARRAY(SELECT upload_pipeline.query_operands(p_query, '&'));
  END IF;
  FOR v_operand IN
    SELECT q.o FROM unnest(v_operands) WITH ORDINALITY q (o, i) GROUP BY q.o ORDER BY min(q.i)
  LOOP
    IF v_operand ~ '^![^!]' THEN
      IF v_operator = '&' THEN
        v_not := CASE WHEN v_not IS NULL THEN v_operand::tsquery ELSE v_not && v_operand::tsquery END;
      END IF;
    ELSE
      terms := terms || v_operand::tsquery;
      v_phrase := CASE WHEN v_phrase IS NULL THEN v_operand::tsquery
                       ELSE tsquery_phrase(v_phrase, v_operand::tsquery) END;
    END IF;
  END LOOP;
  operands := cardinality(terms);
  IF operands > 1 THEN
    terms := terms || v_phrase;
  END IF;
  gates := ARRAY(SELECT upload_pipeline.tsquery_gate(t) FROM unnest(terms) WITH ORDINALITY u (t, i) ORDER BY u.i);
  pools := ARRAY(SELECT CASE WHEN v_not IS NULL THEN t ELSE t && v_not END
                 FROM unnest(terms[1:operands]) WITH ORDINALITY u (t, i) ORDER BY u.i);
END
$$;

-- The query identifier_candidates runs. $1 the query, $2 its terms, $3 their gates, $4 the documents to look in
-- (NULL: every ready one), $5 count, $6 the terms' pools, $7 the query's gate, $8 recheck, $9 operands (see
-- query_terms). Its cost is bounded by constants, whatever the caller's chunks (C = 1,000; P = 8 x count, at most
-- C; rows of chunk_keywords through the caller's part of the (user_id, tsv) index):
--   w, t : each term's document frequency, counted up to C + 1 by its gate (no chunk's words read). A term found
--          in more than C chunks is common: its frequency is taken as C + 1 (its IDF is low anyway, so the
--          estimate barely moves the ranking). A phrase whose words are all in at most P chunks is counted exactly
--          among those (their words checked: at most P); in more, its frequency is its words' count, an upper
--          bound. Chunks of documents not ready yet are counted too.
--   hit1 : the chunks of ready documents matching the whole query, at most P (a query with phrases: looked for
--          among the first C chunks of ready documents its gate matches). A chunk of a document still processing
--          or failed (a failed one keeps its chunks) takes no place under the cap: each match's document is looked
--          up by primary key.
--   hit2 : only when hit1 holds fewer than $5 (else every listed chunk comes from it), at most P more chunks of
--          ready documents matching a term's pool, the rarest term first; only terms of at most C chunks add any
--          (their gate bounds what the index returns).
--   pool : those chunks, each once, read by primary key (a subquery per chunk, OFFSET 0, so that the planner
--          cannot join them to all of the caller's rows instead; their documents checked ready again), their words
--          detoasted once.
--   c    : N, the chunks of the caller's ready documents (among $4) by documents.chunks_total, summed over at most
--          1,000 documents (a lower bound above that) and at least every term's frequency; avgdl, the pool's
--          average number of distinct words; whether any term is rare (at most C chunks).
-- Rank, when a term is rare: (1 if the chunk matches the whole query, else 0, plus bm25 / (bm25 + 1)) / 2, BM25
-- (k1 1.2, b 0.75) over the terms, a term's frequency in a chunk ts_rank_cd's count of its covers with every weight
-- 1 (one per occurrence; gaps left by stop words inside a phrase, which ts_rank_cd counts as noise, are made up for
-- by 1 + the gaps). When every term is common, the list before instead: ts_rank_cd(tsv, query, 32) over hit1, and
-- `boosted` false. Run through EXECUTE, so every parameter is a constant of the plan; tests EXPLAIN this text.
CREATE FUNCTION upload_pipeline.identifier_candidates_sql() RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT 'WITH w AS MATERIALIZED (SELECT q.n, q.term, q.pool, q.term::text ~ ''<(-|[0-9]+)>'' AS phrase, '
         'CASE WHEN q.gate IS NULL THEN 1001 ELSE (SELECT count(*) FROM (SELECT 1 FROM upload_pipeline.chunk_keywords k '
         'WHERE k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ q.gate '
         'AND ($4::uuid[] IS NULL OR k.document_id = ANY ($4)) LIMIT 1001) x) END AS words '
         'FROM unnest($2::tsquery[], $3::tsquery[], $6::tsquery[]) WITH ORDINALITY q (term, gate, pool, n)), '
         't AS MATERIALIZED (SELECT w.n, w.term, w.pool, 1 + (SELECT coalesce(sum(g[1]::integer - 1), 0) '
         'FROM regexp_matches(w.term::text, ''<([0-9]+)>'', ''g'') g) AS gaps, '
         'CASE WHEN w.phrase AND w.words <= least(8::bigint * $5, 1000) THEN (SELECT count(*) FROM upload_pipeline.chunk_keywords k '
         'WHERE k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ w.term '
         'AND ($4::uuid[] IS NULL OR k.document_id = ANY ($4))) ELSE w.words END AS df FROM w), '
         'hit1 AS MATERIALIZED ('
         '(SELECT k.chunk_id FROM upload_pipeline.chunk_keywords k '
         'WHERE $7::tsquery IS NOT NULL AND NOT $8 AND k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ $1 '
         'AND ($4::uuid[] IS NULL OR k.document_id = ANY ($4)) '
         'AND EXISTS (SELECT 1 FROM upload_pipeline.documents d WHERE d.id = k.document_id AND d.user_id = k.user_id AND d.status = ''ready'') '
         'LIMIT least(8::bigint * $5, 1000)) '
         'UNION ALL '
         '(SELECT g.chunk_id FROM (SELECT k.chunk_id, k.tsv FROM upload_pipeline.chunk_keywords k '
         'WHERE $7::tsquery IS NOT NULL AND $8 AND k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ $7 '
         'AND ($4::uuid[] IS NULL OR k.document_id = ANY ($4)) '
         'AND EXISTS (SELECT 1 FROM upload_pipeline.documents d WHERE d.id = k.document_id AND d.user_id = k.user_id AND d.status = ''ready'') '
         'LIMIT 1000) g '
         'WHERE g.tsv @@ $1 LIMIT least(8::bigint * $5, 1000))), '
         'hit2 AS MATERIALIZED (SELECT x.chunk_id FROM (SELECT t.pool, t.df, t.n FROM t '
         'WHERE t.df <= 1000 AND t.n <= $9 AND (SELECT count(*) FROM hit1) < $5 ORDER BY t.df, t.n) r '
         'CROSS JOIN LATERAL (SELECT k.chunk_id FROM upload_pipeline.chunk_keywords k '
         'WHERE k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ r.pool '
         'AND ($4::uuid[] IS NULL OR k.document_id = ANY ($4)) '
         'AND EXISTS (SELECT 1 FROM upload_pipeline.documents d WHERE d.id = k.document_id AND d.user_id = k.user_id AND d.status = ''ready'') '
         'LIMIT least(8::bigint * $5, 1000)) x '
         'LIMIT least(8::bigint * $5, 1000)), '
         'pool AS MATERIALIZED (SELECT k.chunk_id, k.tsv || ''''::tsvector AS tsv '
         'FROM (SELECT h.chunk_id FROM hit1 h UNION SELECT h.chunk_id FROM hit2 h) p '
         'CROSS JOIN LATERAL (SELECT k.chunk_id, k.tsv FROM upload_pipeline.chunk_keywords k '
         'WHERE k.chunk_id = p.chunk_id AND k.user_id = upload_pipeline.current_user_id() '
         'AND EXISTS (SELECT 1 FROM upload_pipeline.documents d WHERE d.id = k.document_id AND d.user_id = k.user_id '
         'AND d.status = ''ready'' OFFSET 0) OFFSET 0) k), '
         'm AS MATERIALIZED (SELECT p.chunk_id, p.tsv, p.tsv @@ $1 AS every, length(p.tsv) AS len FROM pool p), '
         'c AS MATERIALIZED (SELECT greatest((SELECT coalesce(sum(x.chunks_total), 0) FROM (SELECT d.status, '
         'd.chunks_total FROM upload_pipeline.documents d WHERE d.user_id = upload_pipeline.current_user_id() '
         'AND ($4::uuid[] IS NULL OR d.id = ANY ($4)) ORDER BY d.created_at DESC, d.id DESC LIMIT 1000) x '
         'WHERE x.status = ''ready''), '
         '(SELECT max(t.df) FROM t), (SELECT count(*) FROM m))::double precision AS n, '
         'greatest((SELECT avg(m.len) FROM m), 1)::double precision AS avgdl, '
         'EXISTS (SELECT 1 FROM t WHERE t.df <= 1000) AS rare), '
         'b AS (SELECT m.chunk_id, sum(ln(1 + (c.n - t.df + 0.5) / (t.df + 0.5)) * f.tf * 2.2 '
         '/ (f.tf + 1.2 * (0.25 + 0.75 * m.len / c.avgdl))) AS bm25 '
         'FROM c CROSS JOIN m CROSS JOIN t CROSS JOIN LATERAL '
         '(SELECT ts_rank_cd(''{1,1,1,1}'', m.tsv, t.term, 0) * t.gaps AS tf) f '
         'WHERE c.rare AND m.tsv @@ t.term GROUP BY m.chunk_id) '
         'SELECT m.chunk_id AS id, CASE WHEN c.rare THEN (m.every::integer + coalesce(b.bm25, 0) / (coalesce(b.bm25, 0) + 1)) / 2 '
         'ELSE ts_rank_cd(m.tsv, $1, 32) END::double precision AS rank, c.rare AS boosted '
         'FROM m CROSS JOIN c LEFT JOIN b ON b.chunk_id = m.chunk_id '
         'WHERE c.rare OR m.every '
         'ORDER BY rank DESC, m.chunk_id LIMIT $5'
$$;

-- The keyword list of an identifier-like query: ids and ranks of the caller's chunks of ready documents matching
-- `p_query` or some of its terms, among the documents `p_documents` (NULL: all), best `p_limit` first (see
-- identifier_candidates_sql), and whether the list is ranked by BM25 (`boosted`: search_chunks then weighs it
-- identifier_boost() times more; false when every term is common, and the list is the list before). No rows for a
-- query without a positive term (stop words, exclusions only).
-- SECURITY DEFINER for the reason keyword_candidates is (20261201000001_hybrid_search.sql): it asks for the
-- caller's rows itself, `user_id = current_user_id()` on chunk_keywords and on documents, so that the index can
-- serve `tsv @@ query`, and returns ids and ranks only.
CREATE FUNCTION upload_pipeline.identifier_candidates(p_query tsquery, p_documents uuid[], p_limit integer)
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
    USING v_query, v.terms, v.gates, p_documents, p_limit, v.pools, v.gate, v.recheck, v.operands;
END
$$;

-- search_chunks' query (20261202000001_tenant_search.sql), its keyword list by `p_list`: 'keyword'
-- (keyword_candidates, as before), 'identifier' (identifier_candidates: its rows marked `boosted` weigh $9 times
-- the keyword weight in the fusion) or 'none' (no keyword list: the query has no positive term). The same
-- parameters, and one more: $1 query vector, $2 tsquery, $3 documents, $4 candidates, $5 rrf_k, $6 vector weight,
-- $7 keyword weight, $8 count, $9 identifier boost.
CREATE FUNCTION upload_pipeline.search_chunks_sql(
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
        CASE p_list
          WHEN 'identifier' THEN format('SELECT k.id, k.rank, k.boosted FROM upload_pipeline.identifier_candidates($2, %s, $4) k',
                                        CASE WHEN p_filtered THEN '$3' ELSE 'NULL' END)
          WHEN 'none' THEN 'SELECT NULL::uuid AS id, NULL::real AS rank WHERE false'
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

-- The query of every other search, as before (tests EXPLAIN it by this signature).
CREATE OR REPLACE FUNCTION upload_pipeline.search_chunks_sql(
  p_mode text, p_model text, p_dimensions integer, p_filtered boolean, p_exact boolean)
RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT upload_pipeline.search_chunks_sql(p_mode, p_model, p_dimensions, p_filtered, p_exact, 'keyword')
$$;

-- search_chunks, as before but for identifier-like queries (see the top): in keyword and hybrid modes their
-- keyword list is identifier_candidates', and in hybrid mode it weighs keyword_weight x identifier_boost() (unless
-- every term of the query is common: identifier_candidates then marks its rows not `boosted`). A query without a
-- positive term (`-draft`, stop words) gets no keyword list: no hits in keyword mode, the vector list alone in
-- hybrid mode. The same signature, arguments, checks and results; the same promises (the best match_count chunks
-- of the caller's ready documents, under row-level security, among the documents the filter lets through).
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
    -- The cheap test first: query_terms reads the query character by character, so only short queries get it;
    -- one of more than 8 terms (`a|b|c|...` is one word) keeps the sentence path.
    IF upload_pipeline.identifier_query(query_text) THEN
      v_terms := cardinality((upload_pipeline.query_terms(upload_pipeline.strip_double_negation(v_query))).terms);
      v_list := CASE WHEN v_terms = 0 THEN 'none' WHEN v_terms <= 8 THEN 'identifier' ELSE 'keyword' END;
    ELSIF querytree(upload_pipeline.strip_double_negation(v_query)) IN ('', 'T') THEN
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

-- Postgres lets PUBLIC execute every new function; the app role gets what search_chunks calls.
REVOKE EXECUTE ON FUNCTION
  upload_pipeline.identifier_boost(),
  upload_pipeline.identifier_query(text),
  upload_pipeline.strip_double_negation(tsquery),
  upload_pipeline.tsquery_gate(tsquery),
  upload_pipeline.query_operands(tsquery, text),
  upload_pipeline.query_terms(tsquery),
  upload_pipeline.identifier_candidates_sql(),
  upload_pipeline.identifier_candidates(tsquery, uuid[], integer),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean, text)
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
  upload_pipeline.identifier_boost(),
  upload_pipeline.identifier_candidates_sql(),
  upload_pipeline.identifier_query(text),
  upload_pipeline.strip_double_negation(tsquery),
  upload_pipeline.tsquery_gate(tsquery),
  upload_pipeline.query_operands(tsquery, text),
  upload_pipeline.query_terms(tsquery),
  upload_pipeline.identifier_candidates(tsquery, uuid[], integer),
  upload_pipeline.search_chunks_sql(text, text, integer, boolean, boolean, text)
TO upload_pipeline_app;
