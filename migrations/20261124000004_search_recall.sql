-- HNSW search breadth for match_chunks (the API's search and agents' SQL): hnsw.ef_search 100 instead of pgvector's
-- default 40. `make bench` (the search scenario: 100,000 chunks of 384 dimensions, 200 queries) measured recall@10
-- against an exact scan of 0.928 to 0.975 at 40 over three index builds, and 0.966 to 0.990 at 100, for about
-- 0.3 ms more per query in SQL (p50 0.9 -> 1.2 ms); 200 gives 0.987 to 0.995 for another 0.8 ms. The setting
-- applies inside the function only; a session's own hnsw.ef_search is left alone.
ALTER FUNCTION upload_pipeline.match_chunks(vector, integer, jsonb) SET hnsw.ef_search = 100;
