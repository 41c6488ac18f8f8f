-- Each user's chunks of each model, and of each document, for searches that read them all (issue 20, item 4; used
-- by the next migration, 20261202000001_tenant_search.sql, which says why). Built in the migration's transaction,
-- not CONCURRENTLY: a concurrent build that fails (a replica starting at the same moment waits on the migrator's
-- lock, which the build must wait out: a deadlock, which Postgres breaks by failing the build) leaves an invalid
-- index behind that `IF NOT EXISTS` would then take for built. A btree over three narrow columns builds in seconds
-- at a million chunks; chunk writes wait for it meanwhile.
CREATE INDEX IF NOT EXISTS document_chunks_user_model
  ON upload_pipeline.document_chunks (user_id, embedding_model, document_id);
