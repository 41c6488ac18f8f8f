-- Fleet-wide reads for /metrics. Like stale_jobs, these run as the function's owner, so they see every user's
-- rows; they return counts only, never content.

-- Documents by status, for upload_pipeline_documents_stored_documents. An index-only scan of this index keeps a
-- scrape cheap at millions of documents (about 50 ms per million rows).
CREATE INDEX documents_status_idx ON upload_pipeline.documents (status);

CREATE FUNCTION upload_pipeline.document_status_counts()
RETURNS TABLE (status text, documents bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
  SELECT d.status, count(*) FROM upload_pipeline.documents d GROUP BY d.status
$$;

REVOKE ALL ON FUNCTION upload_pipeline.document_status_counts() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.document_status_counts() TO upload_pipeline_app;
