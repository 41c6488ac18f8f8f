-- The reconciler walks the unsettled stages in keyset pages (a backlog of a million queued stages is read a page at
-- a time across passes, never re-read from its oldest row every pass), and pushes again only the jobs that are
-- nowhere in Redis (pushes are deduplicated by job id there). The two-argument stale_jobs of earlier releases stays
-- for producers still running them during a rolling upgrade.
DROP INDEX upload_pipeline.upload_jobs_unsettled;
CREATE INDEX upload_jobs_unsettled ON upload_pipeline.upload_jobs (updated_at, document_id, stage)
  WHERE state IN ('queued', 'running', 'failed');

CREATE FUNCTION upload_pipeline.stale_jobs(
  p_before timestamptz, p_after_ts timestamptz, p_after_doc uuid, p_after_stage text, p_limit integer)
RETURNS TABLE (document_id uuid, user_id uuid, stage text, state text, attempts integer, updated_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, upload_pipeline AS $$
  SELECT j.document_id, j.user_id, j.stage, j.state, j.attempts, j.updated_at
  FROM upload_pipeline.upload_jobs j
  WHERE j.state IN ('queued', 'running', 'failed') AND j.updated_at < p_before
    AND (j.updated_at, j.document_id, j.stage) > (p_after_ts, p_after_doc, p_after_stage)
  ORDER BY j.updated_at, j.document_id, j.stage
  LIMIT p_limit
$$;

REVOKE ALL ON FUNCTION upload_pipeline.stale_jobs(timestamptz, timestamptz, uuid, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION upload_pipeline.stale_jobs(timestamptz, timestamptz, uuid, text, integer) TO upload_pipeline_app;
