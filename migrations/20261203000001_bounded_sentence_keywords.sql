-- The keyword list of a sentence reads a bounded number of chunks (issue 20, item 4: tenant-correct search at any
-- size, p95 within 30 ms for hybrid).
--
-- Until now keyword_candidates ranked EVERY chunk of the caller's matching the query by ts_rank_cd, then kept the
-- best `candidates`: a sentence of common words (every word of `the database keeps the page of it` is in each of a
-- tenant's 12,000 chunks) read and ranked all of them, its cost growing with the tenant. Now it reads at most
-- P = least(8 x count, 1000) matching chunks of ready documents, the first the index returns, and ranks those: the
-- same cap, and the same price, as an identifier-like query's list (20261203000000_keyword_ranking.sql): among more
-- than P chunks matching the whole sentence, the ones ranked are not necessarily the best. A sentence's words
-- rarely all meet in more than P chunks (on the evaluation set no question's do, so its figures do not move), and
-- where they do the vector list carries the search. The index itself still walks the caller's posting lists of
-- the query's words, as before.
-- Same signature, caller and promises: `user_id = current_user_id()`, ready documents only, among $2 when given.
CREATE OR REPLACE FUNCTION upload_pipeline.keyword_candidates_sql() RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT 'SELECT m.id, ts_rank_cd(m.tsv, $1, 32) AS rank FROM ('
         'SELECT k.chunk_id AS id, k.tsv '
         'FROM upload_pipeline.chunk_keywords k JOIN upload_pipeline.documents d ON d.id = k.document_id '
         'WHERE k.user_id = upload_pipeline.current_user_id() AND k.tsv @@ $1 AND d.user_id = k.user_id '
         'AND d.status = ''ready'' AND ($2::uuid[] IS NULL OR k.document_id = ANY ($2)) '
         'LIMIT least(8::bigint * $3, 1000)) m '
         'ORDER BY rank DESC, m.id LIMIT $3'
$$;

-- With a LIMIT before the ranking, a plan that returns its first rows soonest may look cheapest: a sequential scan
-- of the whole table, every tenant's rows, where the (user_id, tsv) index reads only the caller's. As
-- identifier_candidates does, keyword_candidates plans without sequential scans.
ALTER FUNCTION upload_pipeline.keyword_candidates(tsquery, uuid[], integer) SET enable_seqscan = off;
